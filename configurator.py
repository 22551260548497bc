"""
Command-line overrides for train.py and sample.py.

Both scripts define their settings as plain global variables, then call

    apply_overrides(globals(), config_keys)

which reads arguments like `--batch_size=32 --device=cpu --start="To be"` and replaces the
matching globals. Every value is parsed as a Python literal where it can be (32 -> int,
1e-3 -> float, False -> bool, 'out' -> str), and is otherwise taken as the raw string. The new
value must have the type of the default, so a typo fails loudly instead of training the wrong
model: an int is accepted where a float is expected, a bool must be written True or False.
A mistake prints one line and exits with status 2, the usual code for bad command-line usage.
"""

import ast
import sys


def _fail(message):
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _parse(key, text, default):
    """Turn the text after `--key=` into a value of the same type as `default`."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text                            # not a Python literal: a bare string like cpu
    if isinstance(default, str):
        # a string setting takes the text as written, even if it happens to look like a number
        return value if isinstance(value, str) else text
    if isinstance(default, bool):               # test bool before int: bool is a subclass of int
        if isinstance(value, bool):
            return value
        _fail(f"--{key}={text}: expected True or False")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)                     # --min_lr=0 means 0.0
    if type(value) is not type(default):
        _fail(f"--{key}={text}: expected a value of type {type(default).__name__} "
              f"(default {default!r}), got {type(value).__name__}")
    return value


def apply_overrides(config, keys, args=None):
    """Apply `--key=value` arguments (default: sys.argv[1:]) to the dict `config`, in place.

    Only the names in `keys` may be set. Returns the dict of the values that were overridden."""
    args = sys.argv[1:] if args is None else args
    valid = "valid keys: " + ", ".join(keys)
    overrides = {}
    for arg in args:
        if arg in ('-h', '--help'):
            print("options (--key=value), with their defaults:")
            for key in keys:
                print(f"  --{key}={config[key]!r}")
            raise SystemExit(0)
        if not arg.startswith('--') or '=' not in arg:
            _fail(f"bad argument {arg!r}: expected --key=value; {valid}")
        key, text = arg[2:].split('=', 1)
        if key not in keys:
            _fail(f"unknown option --{key}; {valid}")
        overrides[key] = config[key] = _parse(key, text, config[key])
    for key, value in overrides.items():
        print(f"override: {key} = {value!r}")
    return overrides
