"""Run by tests/test_verl_real.py with a Python that has veRL 0.6.1's Hydra: compose recipe/prime's
config (the checkout's recipe/prime/config/prime_trainer.yaml over verl/trainer/config, as the
recipe's entry point does from the checkout) with the overrides run_prime.sh passes. Hydra stops on
a key the config does not have (without a leading +) or a value of the wrong type. Then each
override's key is read back from the composed config and compared with the override's value as
Hydra parses it. Prints one JSON object: {"ok": true, "checked": the number of overrides read back,
"differ": [key, override value, composed value] for each that differs} or {"ok": false, "error":
the first line of Hydra's error}.

Usage: python verl_compose.py VERL_CHECKOUT OVERRIDES.json
"""
import json
import os
import sys

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

checkout, overrides = os.path.abspath(sys.argv[1]), json.load(open(sys.argv[2]))
os.chdir(checkout)  # prime_trainer.yaml searches file://verl/trainer/config from here
try:
    with initialize_config_dir(config_dir=os.path.join(checkout, "recipe", "prime", "config"), version_base=None):
        cfg = compose(config_name="prime_trainer", overrides=overrides)
except Exception as e:  # hydra's ConfigCompositionException, OverrideParseException, ...
    print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}))
    sys.exit(0)
differ = []
for o in OverridesParser.create().parse_overrides(overrides):
    want, got = o.value(), OmegaConf.select(cfg, o.key_or_group)
    got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
    if got != want:
        differ.append([o.key_or_group, want, got])
print(json.dumps({"ok": True, "checked": len(overrides), "differ": differ}))
