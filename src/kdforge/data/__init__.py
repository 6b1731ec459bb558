"""Prompt sets, conversation formats, chat templating and assistant-only label masks."""
