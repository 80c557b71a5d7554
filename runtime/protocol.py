"""pt-serve's wire format: OpenAI's completions API as pydantic models, plus prefixkit's
extensions (`num_beams`, `length_penalty`). The server takes these typed requests and never
parses JSON by hand."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields prefixkit does not use

    model: str = Field(description="The prefix to generate with, or the backbone's name for none.")
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    stop: str | list[str] | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    # prefixkit extensions
    num_beams: int = Field(1, ge=1, le=16)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = Field(0, ge=0)
    min_tokens: int = Field(0, ge=0)
    user: str | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


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
    prefix_len: int | None = None
    training: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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
    error: ErrorBody
