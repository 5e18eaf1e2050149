"""cosmic_tl: find the refusal direction in a chat model's activations (COSMIC) on TransformerLens.

A minimal example::

    import cosmic_tl as ct

    model = ct.load_model("smollm2-135m-instruct")
    harmful = ct.sample_prompts(ct.load_bundled("harmful", "train"), 64, seed=42)
    harmless = ct.sample_prompts(ct.load_bundled("harmless", "train"), 64, seed=42)
    cands = ct.compute_candidates(model, harmful, harmless)
    scores = ct.score_candidates(model, cands, harmful_val, harmless_val, mode="ace")
    pick = ct.select_cosmic(scores, candidates=cands)
    baseline = ct.select_refusal_tokens(scores, candidates=cands)
    ct.compare(pick, baseline)
"""

from cosmic_tl.audit import Audit, audit
from cosmic_tl.bootstrap import Stability, stability
from cosmic_tl.candidates import Candidates, IncompatibleError, compute_candidates
from cosmic_tl.comparison import Comparison, compare
from cosmic_tl.config import PRESETS, Config, SelectionSettings, preset
from cosmic_tl.engine import Runner, clean_logits
from cosmic_tl.evaluation import (
    DEFAULT_REFUSAL_PHRASES,
    ClassifierJudge,
    EvalResult,
    Rate,
    SubstringJudge,
    attack_success_rate,
    evaluate,
    generate,
    refusal_rate,
    wilson_interval,
)
from cosmic_tl.formats import (
    FORMAT_NAMES,
    PROMPT_FORMATS,
    PromptFormatError,
    prompt_format,
    use_prompt_format,
)
from cosmic_tl.interventions import (
    HookPoints,
    Intervention,
    ablate,
    add,
    affine_ablate,
    affine_add,
    intervene,
    intervention_hooks,
    unit,
)
from cosmic_tl.models import ModelSpecError, load_model
from cosmic_tl.models.organisms.planted import Planted, build_planted
from cosmic_tl.planner import score_candidates, suggest_refusal_tokens
from cosmic_tl.prompts import (
    PromptFileError,
    clean_prompts,
    load_bundled,
    load_prompts,
    reference_sample,
    sample_prompts,
)
from cosmic_tl.scoring import Scores, default_refusal_tokens, encode_refusal_tokens
from cosmic_tl.selection import (
    NoCandidateError,
    Selection,
    select_cosmic,
    select_refusal_tokens,
    select_substring,
)
from cosmic_tl.sweep import cellwise, sweep
from cosmic_tl.templates import (
    ChatTemplateError,
    Prompts,
    chat_prompts,
    end_of_instruction,
    format_prompt,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "FORMAT_NAMES",
    "PRESETS",
    "Audit",
    "PROMPT_FORMATS",
    "Candidates",
    "ChatTemplateError",
    "ClassifierJudge",
    "Comparison",
    "Config",
    "EvalResult",
    "HookPoints",
    "IncompatibleError",
    "Intervention",
    "ModelSpecError",
    "Planted",
    "NoCandidateError",
    "PromptFileError",
    "PromptFormatError",
    "Prompts",
    "Rate",
    "Runner",
    "Scores",
    "SelectionSettings",
    "Selection",
    "Stability",
    "SubstringJudge",
    "ablate",
    "add",
    "affine_ablate",
    "affine_add",
    "attack_success_rate",
    "audit",
    "build_planted",
    "cellwise",
    "chat_prompts",
    "clean_logits",
    "clean_prompts",
    "compare",
    "compute_candidates",
    "default_refusal_tokens",
    "encode_refusal_tokens",
    "end_of_instruction",
    "evaluate",
    "format_prompt",
    "generate",
    "intervene",
    "intervention_hooks",
    "load_bundled",
    "load_model",
    "load_prompts",
    "preset",
    "prompt_format",
    "reference_sample",
    "refusal_rate",
    "sample_prompts",
    "score_candidates",
    "select_cosmic",
    "select_refusal_tokens",
    "select_substring",
    "stability",
    "suggest_refusal_tokens",
    "sweep",
    "unit",
    "use_prompt_format",
    "wilson_interval",
]
