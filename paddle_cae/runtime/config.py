"""YAML config files + command-line overrides, with the official flag names.

Precedence, lowest first: the argument table's defaults < the YAML file(s) given with
``--config`` < flags on the command line. Every YAML key is a flag of the same name.

* A YAML file may start from another one with ``_base_: other.yaml`` (path relative to the
  file); the file's own keys win.
* Unknown keys (file or command line) and bad values (wrong type, out of range, not one of
  the choices) raise :class:`ConfigError` with the file, the key and what was expected.
* Booleans that the official scripts declare ``store_true`` keep that meaning (``--flag``
  alone = true) and also accept a value: ``--flag false``. ``store_false`` companions such as
  ``--no_auto_resume`` are kept as in the official scripts.
* ``--model_args '{"embed_dim": 64, "depth": 2}'`` (JSON or inline YAML) -> a dict.
* Aliases (e.g. the Paddle CAE ``--dual_loss_weight``) write to the official key.

The argument table is a tuple of :class:`Arg`; see ``paddle_cae/cli/pretrain_args.py``.
"""
import argparse
import difflib
import os
from dataclasses import dataclass, field

import yaml

CONFIG_KEYS = ("config", "given_keys")
BASE_KEY = "_base_"
TYPES = ("int", "float", "str", "bool", "floats", "dict")
_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


class ConfigError(ValueError):
    """A config file or command line names an unknown key or gives a bad value."""


def default_config_dir():
    """The ``configs/`` folder where ``--config`` names are looked up after the path as given."""
    from ..resources import config_dir  # the checkout's configs/, else the installed copy

    return config_dir()


@dataclass(frozen=True)
class Arg:
    """One flag / YAML key.

    type: 'int', 'float', 'str', 'bool', 'floats' (a list, like ``--opt_betas 0.9 0.95``) or
    'dict'. ``default=None`` means "not set" (None is then always accepted).
    For bools, ``negative`` names an official ``store_false`` companion flag
    (``no_auto_resume`` for ``auto_resume``). ``aliases`` are other flag names with the same
    meaning. ``minimum``/``maximum`` bound numbers (inclusive unless ``open_min``)."""

    name: str
    type: str
    default: object = None
    help: str = ""
    choices: tuple = None
    minimum: float = None
    maximum: float = None
    open_min: bool = False
    aliases: tuple = ()
    negative: tuple = ()
    group: str = "general"
    metavar: str = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"Arg {self.name}: type must be one of {TYPES}, got {self.type}")


# --------------------------------------------------------------------------- conversion
def _expected(arg):
    what = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "floats": "a list of numbers", "dict": "a mapping (JSON/YAML, e.g. '{\"depth\": 2}')"}[arg.type]
    bounds = []
    if arg.minimum is not None:
        bounds.append(f"{'>' if arg.open_min else '>='} {arg.minimum}")
    if arg.maximum is not None:
        bounds.append(f"<= {arg.maximum}")
    if bounds:
        what += " " + " and ".join(bounds)
    if arg.choices:
        what += f", one of {list(arg.choices)}"
    return what


def _to_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise TypeError


def _to_number(value, kind):
    if isinstance(value, bool):
        raise TypeError
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                number = float(text)  # "1e3" -> 1000 is fine, "2.5" is not
                if number.is_integer():
                    return int(number)
        raise TypeError
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        return float(value.strip())
    raise TypeError


def convert_value(arg, value, where):
    """Convert ``value`` to ``arg``'s type and check its range; ``where`` names the source."""
    if value is None:
        if arg.default is None or arg.type in ("str", "dict"):
            return None
        raise ConfigError(f"{where}: '{arg.name}' must be {_expected(arg)}, got null")
    try:
        if arg.type == "bool":
            out = _to_bool(value)
        elif arg.type in ("int", "float"):
            out = _to_number(value, arg.type)
        elif arg.type == "str":
            if isinstance(value, (dict, list, bool)):
                raise TypeError
            out = str(value)
        elif arg.type == "floats":
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            if not isinstance(value, (list, tuple)):
                value = [value]
            out = [_to_number(v, "float") for v in value]
        else:  # dict
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip() else {}
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise TypeError
            out = dict(value)
    except (TypeError, ValueError, yaml.YAMLError):
        raise ConfigError(f"{where}: '{arg.name}' must be {_expected(arg)}, got {value!r}") from None
    if arg.type in ("int", "float"):
        if arg.minimum is not None and (out < arg.minimum or (arg.open_min and out == arg.minimum)):
            raise ConfigError(f"{where}: '{arg.name}' must be {_expected(arg)}, got {out!r}")
        if arg.maximum is not None and out > arg.maximum:
            raise ConfigError(f"{where}: '{arg.name}' must be {_expected(arg)}, got {out!r}")
    if arg.choices and out not in arg.choices:
        raise ConfigError(f"{where}: '{arg.name}' must be one of {list(arg.choices)}, got {out!r}")
    return out


# the values --amp_dtype accepts, and what each means
AMP_DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def normalize_amp_dtype(args):
    """``args.amp_dtype`` spelled as Paddle names it (fp16 -> float16, bf16 -> bfloat16)."""
    value = getattr(args, "amp_dtype", None)
    if value is not None:
        args.amp_dtype = AMP_DTYPES[str(value).lower()]
    return args


# ----------------------------------------------------------------------------- lookups
class ArgTable:
    """Name/alias lookups over a tuple of :class:`Arg`."""

    def __init__(self, args):
        self.args = tuple(args)
        self.by_name = {}
        self.alias_of = {}
        for arg in self.args:
            for name in (arg.name,) + tuple(arg.aliases):
                if name in self.by_name or name in self.alias_of or name in CONFIG_KEYS:
                    raise ValueError(f"flag name used twice: {name}")
                self.alias_of[name] = arg.name
            self.by_name[arg.name] = arg
        self.negatives = {neg: arg.name for arg in self.args for neg in arg.negative}

    def canonical(self, key):
        return self.alias_of.get(key)

    def suggest(self, key):
        names = list(self.alias_of) + list(self.negatives)
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
        return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""

    def defaults(self):
        return {arg.name: (dict(arg.default) if isinstance(arg.default, dict) else
                           list(arg.default) if isinstance(arg.default, (list, tuple)) else arg.default)
                for arg in self.args}


def given_flags(argv):
    """The option names on a command line (``--x=1`` counts as ``--x``)."""
    return {a.split("=")[0] for a in argv if a.startswith("-")}


def flag_value(argv, name, default=None):
    """The value of ``--name`` on a command line (``--name v`` or ``--name=v``; the last one
    wins), else ``default``; no parsing beyond that."""
    value = default
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _as_table(table):
    return table if isinstance(table, ArgTable) else ArgTable(table)


# ---------------------------------------------------------------------------- YAML files
def resolve_config_path(path, config_dir=None):
    """``path`` as given, else relative to ``config_dir``, with or without ``.yaml``."""
    candidates = [path, path + ".yaml"] if not str(path).endswith((".yaml", ".yml")) else [path]
    if config_dir and not os.path.isabs(path):
        candidates += [os.path.join(config_dir, c) for c in list(candidates)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    where = f" (also looked in {config_dir})" if config_dir else ""
    raise ConfigError(f"--config: file '{path}' not found{where}")


def read_yaml(path, _seen=()):
    """Raw key/values of a YAML file, following ``_base_`` chains (the file's keys win)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: '{BASE_KEY}' chain loops back to this file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    items = [(str(k), v, path) for k, v in data.items() if k != BASE_KEY]
    base = data.get(BASE_KEY)
    if base:
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: {BASE_KEY} '{base}' not found (looked for {base_path})")
        return read_yaml(base_path, _seen + (path,)) + items
    return items


def load_config(path, table, config_dir=None):
    """Validated values of a YAML config: {canonical key: value}. Raises ConfigError."""
    table = _as_table(table)
    path = resolve_config_path(path, config_dir)
    values = {}
    for key, value, source in read_yaml(path):
        if key in table.negatives:
            arg = table.by_name[table.negatives[key]]
            flag = convert_value(Arg(key, "bool", False), value, source)
            values[arg.name] = not flag if flag else values.get(arg.name, arg.default)
            continue
        name = table.canonical(key)
        if name is None:
            raise ConfigError(f"{source}: unknown key '{key}'{table.suggest(key)}")
        values[name] = convert_value(table.by_name[name], value, source)
    return values


# ------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"command line: {message}")


def _suggesting_error(table, parser):
    def error(message):
        if "unrecognized arguments" in message:
            flags = [tok for tok in message.split(":", 1)[1].split() if tok.startswith("--")]
            hints = "".join(table.suggest(f.lstrip("-").split("=")[0]) for f in flags[:1])
            message += hints
        raise ConfigError(f"command line: {message}")
    parser.error = error
    return parser


def build_parser(table, defaults=None, description=None, prog=None):
    """An argparse parser for ``table`` whose defaults are ``defaults`` (table defaults when None).
    Flags are typed as strings and converted by :func:`convert_value`, so the command line and
    YAML files are checked by the same rules."""
    table = _as_table(table)
    defaults = table.defaults() if defaults is None else defaults
    parser = _suggesting_error(table, _Parser(description=description, prog=prog, allow_abbrev=False,
                                              formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    parser.add_argument("--config", "-c", default=None, metavar="FILE.yaml",
                        help="YAML file whose keys are these flags; the command line overrides it")
    groups = {}
    for arg in table.args:
        group = groups.get(arg.group)
        if group is None:
            group = groups[arg.group] = parser.add_argument_group(arg.group)
        flags = [f"--{n}" for n in (arg.name,) + tuple(arg.aliases)]
        help_text = arg.help + (f" [aliases: {', '.join(flags[1:])}]" if arg.aliases else "")
        if arg.type == "bool":
            group.add_argument(*flags, dest=arg.name, nargs="?", const="true", default=defaults[arg.name],
                               metavar="BOOL", help=help_text)
            for neg in arg.negative:
                group.add_argument(f"--{neg}", dest=arg.name, action="store_const", const="false",
                                   help=f"same as --{arg.name} false")
        elif arg.type == "floats":
            group.add_argument(*flags, dest=arg.name, nargs="+", default=defaults[arg.name],
                               metavar=arg.metavar or "X", help=help_text)
        else:
            group.add_argument(*flags, dest=arg.name, default=defaults[arg.name],
                               metavar=arg.metavar or arg.type.upper(), help=help_text)
    return parser


def parse_args(argv=None, table=(), config_dir=None, description=None, prog=None):
    """Parse ``argv`` (sys.argv[1:] when None): table defaults < ``--config`` file < flags.
    Returns an ``argparse.Namespace`` with every table key (``config`` holds the file's path)
    and ``given_keys``: the sorted keys the config file or the command line set (the others
    hold their table default), so nothing has to read the file again to learn it."""
    table = _as_table(table)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", "-c", default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = table.defaults()
    config_path = None
    given = set()
    if known.config:
        config_path = resolve_config_path(known.config, config_dir)
        from_file = load_config(config_path, table)
        defaults.update(from_file)
        given.update(from_file)
    parser = build_parser(table, defaults, description=description, prog=prog)
    namespace = parser.parse_args(argv)
    for arg in table.args:
        value = getattr(namespace, arg.name)
        if value is defaults[arg.name]:
            continue  # came from the table or the file: already checked
        given.add(arg.name)
        setattr(namespace, arg.name, convert_value(arg, value, f"command line --{arg.name}"))
    namespace.config = config_path
    namespace.given_keys = sorted(given)
    return normalize_amp_dtype(namespace)


def to_yaml(namespace, table):
    """The resolved values as YAML text (what a run actually used), in table order."""
    table = _as_table(table)
    data = {arg.name: getattr(namespace, arg.name) for arg in table.args}
    return yaml.safe_dump(data, sort_keys=False)
