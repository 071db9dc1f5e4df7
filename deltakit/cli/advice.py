"""The one place the CLI turns a library error into advice: the error's type and the argument it is
about (``argument="out"``) pick a line, worded with the running command's own flag (``--out``).

Library messages state facts; what to try is the CLI's to say, since only it knows its flags (the
service says it in terms of its request's fields instead).
"""

from __future__ import annotations

import argparse

from ..errors import (
    BaseMismatchError,
    DeltakitError,
    IntegrityError,
    KeyFileError,
    NoSpaceError,
    OutputExistsError,
    RawWeightsError,
    SignatureError,
    UntrustedSignerError,
)
from ..registry import StaleNameError

# (error type, the argument it is about or None for any, advice). The first row that matches speaks;
# {flag} is the command's flag for the argument (a row needing one is skipped where the command has
# none), {error} the error itself. An error about an argument that no row covers gets "check {flag}".
_ADVICE: tuple[tuple[type[DeltakitError], str | None, str], ...] = (
    (RawWeightsError, None, "check which is --base and which is --target; --allow-raw stores such tensors anyway"),
    (StaleNameError, "name", "`deltakit registry remove {error.name}` forgets it"),
    (OutputExistsError, "out", "choose another {flag} or remove it yourself"),
    (OutputExistsError, "name", "pass --force to replace it"),
    (NoSpaceError, "out", "or choose another {flag}"),
    # signatures (before IntegrityError's row: a bad signature is not cured by fetching again)
    (
        UntrustedSignerError,
        None,
        "if you trust that signer, pass its public key with --trust or put it in "
        "$DELTAKIT_HOME/trusted_keys/; else do not use this delta",
    ),
    (
        SignatureError,
        None,
        "the package is not as its signer left it: do not use it; fetch it from its publisher again",
    ),
    (
        KeyFileError,
        "sign",
        "{flag} takes an EC private key in PEM: openssl ecparam -name prime256v1 -genkey -noout -out key.pem",
    ),
    (
        KeyFileError,
        "trust",
        "{flag} takes the signer's EC public key in PEM: openssl ec -in key.pem -pubout -out key.pub",
    ),
    # apply and make
    (BaseMismatchError, "base", "check {flag}: it must be the model the delta was made from, converted the same way"),
    (IntegrityError, "delta", "fetch or copy the delta again"),
    (DeltakitError, "kind", "name the delta's kind with --legacy (fastchat, alpaca or oasst-xor) to apply it anyway"),
    # conversions
    (DeltakitError, "quant", "choose another {flag}: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 need no extra"),
    (DeltakitError, "to", "choose another {flag}"),
    (DeltakitError, "meta_shards", "choose a {flag} that divides the model's head count"),
    # the model card's fields (publish, release)
    (DeltakitError, "base_model", "pass the base's Hub id with --base-model ORG/NAME, or registry add --hub-id"),
    (DeltakitError, "license", "pass a Hub license id with --license (apache-2.0, llama2, other)"),
    (DeltakitError, "license_name", "with --license other, pass --license-name (llama-license) and --license-link"),
    (DeltakitError, "license_link", "with --license other, pass --license-name (llama-license) and --license-link"),
    (DeltakitError, "language", "--language takes ISO 639 codes (en, zh)"),
    (DeltakitError, "datasets", "--dataset takes Hub dataset ids, ORG/NAME"),
    (DeltakitError, "repo_id", "check {flag}: one '/', letters, digits, '-', '_' and '.'"),  # registry import
    (DeltakitError, "repo_id", "check --repo (ORG/NAME)"),
    (DeltakitError, "revision", "check --repo and --revision"),
    # the service's tokens
    (DeltakitError, "token_id", "`deltakit token list` shows each token's id"),
)


def _advice(error: DeltakitError, flags: dict[str, str]) -> str:
    """What to try after ``error``'s own words, as ``"; ..."``, or ``""`` where the CLI has nothing to add.

    Args:
        flags: the running command's flag (or metavar) for each argument, by its destination.
    """
    flag = flags.get(error.argument) if error.argument is not None else None
    for kind, argument, advice in _ADVICE:
        if not isinstance(error, kind) or (argument is not None and error.argument != argument):
            continue
        if "{flag}" in advice and flag is None:
            continue
        return "; " + advice.format(flag=flag, error=error)
    return f"; check {flag}" if flag is not None else ""


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each argument's flag, by destination: its long option (``--out``), else its metavar (``PATH``)."""
    flags = {}
    for action in parser._actions:
        if action.option_strings:
            flags[action.dest] = next(
                (o for o in action.option_strings if o.startswith("--")), action.option_strings[0]
            )
        elif action.dest != argparse.SUPPRESS:
            flags[action.dest] = str(action.metavar or action.dest.upper())
    return flags
