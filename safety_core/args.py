"""The base of every config section: unknown keys are errors, assignments are validated."""

import typing

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def section_type(annotation) -> type[BaseModel] | None:
    """The config section a field's annotation holds (through Optional, unions and lists), or None:
    how an error's location is walked down to the section that names the allowed keys."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = section_type(arg)
        if found is not None:
            return found
    return None
