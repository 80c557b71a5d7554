"""pt-serve's wire format: OpenAI's completions API as pydantic models, plus prefixkit's
extensions (`num_beams`, `length_penalty`). The server takes these typed requests and never
parses JSON by hand: a request validates its own fields and cross-field rules, with the limits
the README states, and converts itself into generation settings (`to_settings`)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .generate import GenerationSettings
from .stops import MAX_STOP_CHARS, MAX_STOPS, check_stops

MAX_PROMPTS = 64  # prompts in one request
MAX_SEED = 2**63 - 1


def _no_lone_surrogates(value: Any) -> Any:
    """Strings that can be written as UTF-8 (JSON's \\ud800 escapes can make ones that cannot)."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text")
    return value


class CompletionRequest(BaseModel):
    # OpenAI clients send fields prefixkit does not use; NaN and Infinity are no numbers here.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(max_length=128, description="The prefix to generate with, or the backbone's name for none.")
    prompt: str | list[str] = Field(description=f"One prompt, or a list of at most {MAX_PROMPTS}.")
    max_tokens: int = Field(16, ge=1)
    stop: str | list[str] | None = Field(
        None, description=f"At most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1)
    stream: bool = False
    # prefixkit extensions
    num_beams: int = Field(1, ge=1, le=16)
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0)
    no_repeat_ngram_size: int = Field(0, ge=0, le=64)
    min_tokens: int = Field(0, ge=0)
    user: str | None = Field(None, max_length=256)

    _strings = field_validator("model", "prompt", "stop", "user")(_no_lone_surrogates)

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not 1 <= len(prompt) <= MAX_PROMPTS:
            raise ValueError(f"a prompt list holds 1 to {MAX_PROMPTS} prompts, not {len(prompt)}")
        return prompt

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stop: str | list[str] | None) -> str | list[str] | None:
        check_stops(stop)
        return stop

    @model_validator(mode="after")
    def _together(self) -> "CompletionRequest":
        if self.n != 1:
            raise ValueError("n must be 1: ask for several prompts in a list instead")
        if self.stream and self.num_beams > 1:
            raise ValueError("stream works with greedy and sampling; set num_beams to 1 or stream false")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        return check_stops(self.stop)

    def to_settings(self, max_tokens_cap: int) -> GenerationSettings:
        """The generation settings this request asks for, within the server's token cap (a
        ValueError in one sentence otherwise). Temperature 0 is greedy; sampling needs one beam."""
        if self.max_tokens > max_tokens_cap:
            raise ValueError(f"max_tokens is {self.max_tokens}; this server allows at most {max_tokens_cap}.")
        sample = self.temperature > 0 and self.num_beams == 1
        return GenerationSettings(
            max_new_tokens=self.max_tokens, min_new_tokens=min(self.min_tokens, self.max_tokens),
            num_beams=self.num_beams, length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size, do_sample=sample,
            temperature=self.temperature if sample else 1.0, top_p=self.top_p if sample else 1.0,
            seed=self.seed,
        ).check()


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prefixkit"
    parent: str | None = None  # a prefix's backbone, as vLLM names a LoRA adapter's base model
    prefix_len: int | None = None
    training: dict[str, Any] | None = None


MODELS_PAGE = 1000  # /v1/models names per page by default ...
MODELS_PAGE_MAX = 10_000  # ... and at most


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    has_more: bool = False  # more names follow: ask again with after=last_id
    last_id: str | None = None


class PrefixUploaded(BaseModel):
    id: str
    prefix_len: int
    replaced: bool


class ReloadResult(BaseModel):
    added: list[str]
    removed: list[str]
    updated: list[str]
    failed: dict[str, str]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, as OpenAI sends it: also the last event of a stream that failed."""

    error: ErrorBody


class Deleted(BaseModel):
    id: str
    deleted: bool = True


class Health(BaseModel):
    status: Literal["ok", "shutting down", "decode loop stopped"]
    backbone: str
    prefixes: int  # in memory (the store may hold many more)
    queue_depth: int
    active_rows: int
    problem: str | None = None
