"""OpenAI API request and response bodies as pydantic models.

FastAPI builds the server's OpenAPI schema from these, so the ranges declared here (temperature
0..2, top_p in (0, 1], max_tokens >= 1, n == 1) are both enforced and published. Requests are
parsed strictly (a string is not a number, 1 is not true); unknown fields are ignored, as clients
send extras this server does not implement (presence_penalty, logit_bias, user, ...). What is refused
says why: more than 4 stop strings, an image/audio/file content part, a message without content or
with tool calls, a lone UTF-16 surrogate in any text that reaches the tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_STOP = 4  # stop strings per request, as in OpenAI's API
MAX_TOP_LOGPROBS = 20  # as in OpenAI's API


def _unicode_text(value: str) -> str:
    """JSON's ``\\ud800`` escapes can smuggle lone UTF-16 surrogates, which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        raise ValueError(f"the text holds a lone UTF-16 surrogate (\\u{ord(bad):04x} at character {e.start}), "
                         "which is not valid Unicode") from None
    return value


def _at_most_four(stops: list[str]) -> list[str]:
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings are supported, got {len(stops)}")
    return stops


# A string in a request that reaches the tokenizer: valid Unicode (no lone surrogates).
Text = Annotated[str, AfterValidator(_unicode_text)]
FinishReason = Literal["stop", "length"]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False,
                                     description="0 is greedy; default 1")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus mass; default 1")]
MaxTokens = Annotated[int, Field(ge=1, description="tokens to generate at most; default: what fits the context")]
Stop = Text | Annotated[list[Text], AfterValidator(_at_most_four), Field(json_schema_extra={"maxItems": MAX_STOP})]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    model: Text  # echoed in answers and errors: a lone surrogate could not even be sent back as JSON
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    stop: Stop | None = Field(None, description="up to 4 strings; the answer is cut before the first")
    seed: int | None = Field(None, description="same seed, same parameters -> same sampled answer")
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension (as in vLLM): do not stop at end of turn")


# The content part types OpenAI defines that this text-only server cannot read, and what to say.
_UNSUPPORTED_PARTS = {"image_url": "image input is not supported", "image": "image input is not supported",
                      "input_image": "image input is not supported", "input_audio": "audio input is not supported",
                      "file": "file input is not supported", "refusal": "refusal parts are not supported"}


class TextPart(_Request):
    type: Literal["text"] = Field(description="only text: this server's models read no images, audio or files")
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        # Before the fields: an image part should hear "image input is not supported", not "type: Input
        # should be 'text'".
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "text":
            reason = _UNSUPPORTED_PARTS.get(kind, f"content parts of type '{kind}' are not supported")
            raise ValueError(f"{reason}: this server reads text only (content parts of type 'text')")
        return data


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] = Field(description="a string or text parts; null is not accepted (it is "
                                           "OpenAI's for assistant tool calls, which are not supported)")
    name: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _has_content(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("tool_calls") or data.get("function_call"):
            raise ValueError("tool calls are not supported: assistant messages must carry their text in 'content'")
        if data.get("content") is None:
            role = data.get("role")
            raise ValueError(f"a{' ' + role if isinstance(role, str) else ''} message needs 'content' "
                             "(a string or text parts)")
        return data

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = Field(None, description="newer name for max_tokens; wins if both")
    logprobs: bool = Field(False, description="return each answer token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with logprobs: the most likely tokens at each position (0..20)")

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value


class CompletionRequest(_SamplingFields):
    prompt: Text | list[int] | list[list[int]] | list[Text] = Field(
        description="text, token ids, or a list of texts or of token-id lists (several prompts: a choice each)")
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        None, description="tokens to generate at most; 0 only with echo (score the prompt, generate nothing, "
        "as vLLM); default: what fits the context")
    echo: bool = Field(False, description="prepend the prompt to the returned text (with logprobs: the prompt's "
                       "tokens too, the first with a null log-probability)")
    logprobs: int | None = Field(None, ge=-1, description="log-probabilities of the generated (and, with echo, "
                                 "the prompt's) tokens and the N likeliest alternatives; -1: the whole "
                                 "vocabulary; at most the server's --max-logprobs (default 20)")
    prompt_logprobs: int | None = Field(None, ge=-1, description="vLLM extension: every prompt token's "
                                        "log-probability and rank, and the N likeliest tokens at its position "
                                        "(choices[].prompt_logprobs); -1: the whole vocabulary; at most "
                                        "--max-logprobs; not with stream")
    return_tokens_as_token_ids: bool = Field(False, description="vLLM extension: tokens in logprobs as "
                                             "'token_id:N' (every token identified, whatever its bytes)")
    add_special_tokens: bool = Field(True, description="vLLM extension: let the tokenizer add its special "
                                     "tokens (BOS) to text prompts")


# ---- responses ---------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The text completions (legacy) shape: parallel lists, one entry per token (with echo, the prompt's first:
    its log-probability and alternatives are null, nothing predicts it). ``top_logprobs`` holds the token
    itself and the N likeliest (so N or N+1 entries)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob``: one token's log-probability at a prompt position."""

    logprob: float
    rank: int | None = Field(None, description="1 + the tokens likelier than it (vLLM counts ties as likelier)")
    decoded_token: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: CompletionLogprobs | None = None
    # vLLM's: None for the first prompt token, then {token id (a string): Logprob} per position, the prompt's
    # own token first. Not in streamed chunks.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    """Also the shape of a streamed chunk (then ``finish_reason`` is null until the last one)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a text ``prompt``, or chat ``messages`` (through the model's chat template)."""

    model: Text | None = None
    prompt: Text | None = Field(None, description="text to tokenize (or messages)")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="a conversation (or prompt)")
    add_special_tokens: bool | None = Field(None, description="add the tokenizer's special tokens (BOS); "
                                            "default true for a prompt, false (the template adds them) for messages")
    add_generation_prompt: bool = Field(True, description="with messages: end with the assistant's turn")
    return_token_strs: bool = Field(False, description="also return each token's text")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """vLLM's /tokenizer_info (what lm-eval's remote tokenizer reads): the tokenizer's configuration."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    model_max_length: int
    add_bos_token: bool | None = None


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
