"""
Config files and command-line overrides for the scripts (train.py, sample.py, eval.py, ...).

Each script defines its settings as plain global variables, then calls

    apply_overrides(globals(), config_keys)

which reads arguments like `config/train_owt_124m.py --batch_size=32 --device=cpu` and replaces
the matching globals. First come any config files: each is a small Python file of assignments
to the script's settings (`batch_size = 32`), run in turn with the settings so far in scope, so
a line like `block_size = 4 * window` works. Then each `--key=value`, parsed as a Python
literal where it can be (32 -> int, 1e-3 -> float, False -> bool, 'out' -> str) and otherwise
taken as the raw string. A new value, from a file or the command line, must have the type of
the default, so a typo fails loudly instead of training the wrong model: an int is accepted
where a float is expected, a bool must be written True or False. A mistake prints one line
(naming the file and line, for a config file) and exits with status 2, the usual code for bad
command-line usage.
"""

import ast
import io
import os
import sys
import textwrap
import tokenize


def _fail(message):
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _check_type(where, value, default):
    """value, if it has the type of default (an int is fine for a float); else stop with one
    line that starts with `where`, the place the value was given."""
    if isinstance(default, bool):               # test bool before int: bool is a subclass of int
        if isinstance(value, bool):
            return value
        _fail(f"{where}: expected True or False")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)                     # --min_lr=0 means 0.0
    if type(value) is not type(default):
        _fail(f"{where}: expected a value of type {type(default).__name__} "
              f"(default {default!r}), got {type(value).__name__}")
    return value


def _parse(key, text, default):
    """Turn the text after `--key=` into a value of the same type as `default`."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text                            # not a Python literal: a bare string like cpu
    if isinstance(default, str):
        # a string setting takes the text as written, even if it happens to look like a number
        return value if isinstance(value, str) else text
    return _check_type(f"--{key}={text}", value, default)


def _read_config_file(path, settings, defaults, valid):
    """Run the config file at path, one statement at a time, with `settings` (the values so far)
    in scope; return the [(key, value)] it assigns, in order, each of its default's type."""
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except FileNotFoundError:
        _fail(f"config file {path}: no such file; give the path of a Python file of settings, "
              f"e.g. config/train_shakespeare.py")
    except OSError as e:                        # a folder, no permission, ...
        _fail(f"config file {path}: cannot read it ({e.strerror}); give the path of a Python "
              f"file of settings")
    except UnicodeDecodeError:
        _fail(f"config file {path} is not UTF-8 text: save it as UTF-8")
    try:
        tree = ast.parse(source, path)
    except SyntaxError as e:                    # (no line number for a null byte)
        where = f"{path}:{e.lineno}" if e.lineno else f"config file {path}"
        _fail(f"{where}: {e.msg}: a config file is Python, lines like batch_size = 32")
    namespace = dict(settings)
    assigned = []
    for node in tree.body:
        where = f"{path}:{node.lineno}"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue                            # a docstring
        if not (isinstance(node, ast.Assign)
                and all(isinstance(target, ast.Name) for target in node.targets)):
            _fail(f"{where}: expected an assignment to a setting, like batch_size = 32: a config "
                  f"file holds nothing else")
        names = [target.id for target in node.targets]
        for name in names:
            if name not in defaults:
                _fail(f"{where}: unknown setting {name!r}; {valid}")
        try:
            exec(compile(ast.Module([node], []), path, 'exec'), namespace)
        except Exception as e:                  # whatever the line raises, in one line
            _fail(f"{where}: {type(e).__name__}: {e}")
        for name in names:
            value = _check_type(f"{where}: {name} = {namespace[name]!r}", namespace[name],
                                defaults[name])
            namespace[name] = value             # later lines see 1 written for a float as 1.0
            assigned.append((name, value))
    return assigned


def _descriptions(path):
    """{setting: the comment beside its assignment in the script at path}, a comment continued
    on the indented comment-only lines below it."""
    with open(path, encoding='utf-8') as f:
        source = f.read()
    comments = {token.start[0]: token.string.lstrip('#').strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    descriptions = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            line = node.end_lineno
            text = [comments[line]] if line in comments else []
            while line + 1 in comments and lines[line].startswith(' ') \
                    and lines[line].lstrip().startswith('#'):
                line += 1
                text.append(comments[line])
            descriptions.setdefault(node.targets[0].id, ' '.join(text))   # the first assignment
    return descriptions


def _print_help(config, keys):
    """The usage, then each setting with its default and the comment beside it in the script."""
    script = config.get('__file__')             # the calling script's globals name it
    descriptions = _descriptions(script) if script else {}
    name = os.path.relpath(script, os.path.dirname(os.path.abspath(__file__))) if script else ''
    print(f"usage: python {name or 'SCRIPT'} [CONFIG_FILE ...] [--key=value ...]")
    print(textwrap.fill(f"Each CONFIG_FILE is a Python file of assignments to the settings "
                        f"below, one a line like {keys[0]} = {config[keys[0]]!r} (config/ holds "
                        f"train.py's recipes); the files run in turn, then each --key=value "
                        f"overrides one setting. A value must have the type of its default.", 90))
    print("\nsettings, with their defaults:")
    options = {key: f"--{key}={config[key]!r}" for key in keys}
    width = min(32, max(map(len, options.values())))
    for key in keys:
        print(f"  {options[key]:<{width}}  {descriptions.get(key, '')}".rstrip())


def apply_overrides(config, keys, args=None):
    """Apply config files, then `--key=value` arguments (default: sys.argv[1:]), to the dict
    `config`, in place; nothing is changed unless all of them are good.

    Only the names in `keys` may be set. Returns the dict of the values that were set, by a
    file or an argument."""
    args = sys.argv[1:] if args is None else args
    if '-h' in args or '--help' in args:
        _print_help(config, keys)
        raise SystemExit(0)
    valid = "valid keys: " + ", ".join(keys)
    defaults = {key: config[key] for key in keys}
    settings = dict(defaults)
    changes = []                                # (where from, key, value), in the order applied
    for i, arg in enumerate(args):
        if not arg.startswith('-') and '=' not in arg:          # a config file
            if any(earlier.startswith('--') for earlier in args[:i]):
                _fail(f"config file {arg} after --key=value options: name the config files "
                      f"first, then the options that override them")
            for key, value in _read_config_file(arg, settings, defaults, valid):
                settings[key] = value
                changes.append((arg, key, value))
            continue
        if not arg.startswith('--') or '=' not in arg:
            _fail(f"bad argument {arg!r}: expected a config file or --key=value; {valid}")
        key, text = arg[2:].split('=', 1)
        if key not in keys:
            _fail(f"unknown option --{key}; {valid}")
        settings[key] = _parse(key, text, defaults[key])
        changes.append(('override', key, settings[key]))
    for where, key, value in changes:
        print(f"{where}: {key} = {value!r}")
    config.update(settings)
    return {key: value for _, key, value in changes}
