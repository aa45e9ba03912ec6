"""Teacher-generated training data: prompts -> teacher -> filters -> an append-only JSONL file + report.

`synthesize(SynthOptions(...))` is what `pocketlm synth` runs. Modules: `prompts` (prompt files and
templates), `teachers` (OpenAI-compatible URL or a local model), `filters` (validators, length, regex,
dedupe, perplexity band), `store` (the fsynced JSONL file and its resume), `run` (the loop and the report).
"""

from pocketlm.synth.filters import FilterSettings
from pocketlm.synth.run import SynthOptions, format_report, synthesize
from pocketlm.synth.teachers import Sampling

__all__ = ["FilterSettings", "Sampling", "SynthOptions", "format_report", "synthesize"]
