"""Error types: every user-facing failure names the field, file and line it comes from."""


class CamopdError(Exception):
    """Base class of the errors a user sees as a clean one-line message (no traceback) from the CLI."""


class SpecError(CamopdError):
    """An experiment spec (YAML + overrides) is malformed, has unknown keys, wrong types or out-of-range values."""


class DataError(CamopdError):
    """A dataset row, tokenizer or prompt is malformed; the message names file and line."""


class TeacherError(CamopdError):
    """A teacher is unreachable, answers malformed/non-finite scores, or does not share the student's tokenizer."""


class CheckpointError(CamopdError):
    """A checkpoint is missing, incomplete or does not match the model it is loaded into."""


class RolloutError(CamopdError):
    """A rollout server of the student is unreachable, answers malformed samples, samples with stale weights, or
    fails a weight sync; the message names the server and the field."""
