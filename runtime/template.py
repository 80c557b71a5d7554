"""The prompt template: the one rule that joins an input to the prefix's expected output.

Training tokenises `apply_template(template, input)` and the output separately and learns the
output after the prompt; the runtime tokenises the same prompt and generates what follows.
The template is stored in the prefix's meta ("template"), so both sides always agree.
"""

from __future__ import annotations

INPUT_FIELD = "{input}"
DEFAULT_TEMPLATE = "{input}"


def check_template(template: str) -> str:
    """The template itself, or a ValueError if it has no (or several) `{input}` fields."""
    count = template.count(INPUT_FIELD)
    if count != 1:
        raise ValueError(
            f"the prompt template {template!r} must contain {INPUT_FIELD} exactly once "
            f"(found {count}); e.g. '{INPUT_FIELD} =>'."
        )
    return template


def apply_template(template: str | None, text: str) -> str:
    """The prompt for one input: the template with `{input}` replaced by the text."""
    return (template or DEFAULT_TEMPLATE).replace(INPUT_FIELD, text, 1)
