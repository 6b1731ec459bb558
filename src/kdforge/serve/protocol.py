"""OpenAI API request and response bodies as pydantic models.

FastAPI builds the server's OpenAPI schema from these, so the ranges declared here (temperature
0..2, top_p in (0, 1], max_tokens >= 1, n == 1) are both enforced and published. Requests are
parsed strictly (a string is not a number, 1 is not true); unknown fields are ignored, as clients
send extras this server does not implement (presence_penalty, logit_bias, user, ...).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length"]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False,
                                     description="0 is greedy; default 1")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus mass; default 1")]
MaxTokens = Annotated[int, Field(ge=1, description="tokens to generate at most; default: what fits the context")]
Stop = str | Annotated[list[str], Field(max_length=4)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    stop: Stop | None = Field(None, description="up to 4 strings; the answer is cut before the first")
    seed: int | None = Field(None, description="same seed, same parameters -> same sampled answer")
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension (as in vLLM): do not stop at end of turn")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = Field(None, description="newer name for max_tokens; wins if both")


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] = Field(
        description="text, token ids, or a list holding one text (one prompt per request)")
    echo: bool = Field(False, description="prepend the prompt to the returned text")


# ---- responses ---------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """Also the shape of a streamed chunk (then ``finish_reason`` is null until the last one)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kdforge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    backend: str
    active: int
    waiting: int
