"""Lists derived from the dataclasses keep the contents they had when they were written by hand, and the
combine rules are one constant (``ensemble_bench.api.COMBINE_RULES``)."""
import ast
import dataclasses
from pathlib import Path

from ensemble_bench import columns, config, metrics, recipe
from ensemble_bench.api import COMBINE_RULES

HARNESS = Path(__file__).resolve().parents[1] / "benchmark"


def test_recipe_field_lists_are_derived_with_the_same_contents():
    assert config.RUN_RECIPE_FIELDS == ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                                        "schedule", "warmup_epochs", "milestones", "lr_decay")
    assert config.RUN_SETTING_FIELDS == ("val_fraction", "bf16", "channels_last")
    assert columns.NUMERIC_RECIPE_KEYS == ("epochs", "batch_size", "lr")
    assert columns.RECIPE_FIELDS == ("schedule", "warmup_epochs", "milestones", "lr_decay", "cycles", "momentum",
                                     "nesterov", "weight_decay", "weight_decay_on", "label_smoothing",
                                     "mixup_alpha", "val_fraction", "bf16", "channels_last", "world_size")
    run_fields = {f.name for f in dataclasses.fields(config.RunConfig)}
    assert set(config.RUN_RECIPE_FIELDS) == run_fields & set(recipe.RECIPE_FIELDS)
    # every RunConfig field has one role: experiment, recipe mode, recipe, setting, execution, derived
    roles = (config.EXPERIMENT_FIELDS, ("recipe",), config.RUN_RECIPE_FIELDS, config.RUN_SETTING_FIELDS,
             config.NON_IDENTITY_FIELDS, config.DERIVED_FIELDS)
    assert sorted(k for r in roles for k in r) == sorted(run_fields)


def test_one_combine_rules_constant():
    assert COMBINE_RULES == ("probs", "logits")
    assert metrics._base.COMBINE_RULES is COMBINE_RULES      # the metrics check combine against the api constant
    hits = []
    for p in sorted(HARNESS.rglob("*.py")):
        if p.name == "api.py" and p.parent == HARNESS:
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.Tuple, ast.Set, ast.List)) and len(n.elts) == 2 and all(
                    isinstance(e, ast.Constant) for e in n.elts) and {e.value for e in n.elts} == set(COMBINE_RULES):
                hits.append(f"{p.relative_to(HARNESS)}:{n.lineno}")
    assert not hits, hits
