"""The plugin's qwen3_5/flags.py knobs the modules import."""
SEQUENCE_PARALLEL = False
ABLATE_MIXERS = ""


def nki_delta_rule_enabled():
    return False


def nki_delta_rule_variant():
    return "fused"
