"""The one spelling of a trainer checkpoint's layout: ``{"engine": ..., "client": ...}``.

Every checkpoint of the package, whatever its store (checkpoint/store.py: a verified file, or the
state DeepSpeed's folder holds once assembled by zero_to_state_dict.py), is::

    {"engine": {"model": state_dict, "optimizer": ... or None, "lr_scheduler": ...},
     "client": {"config": resolved config (Config.model_dump(mode="json")), "train_state": ...,
                "ema": ..., "class_names": ..., ...}}

``engine`` is what ``Engine.state_dict`` returns; ``client`` the trainer's components
(trainer.py). Writers build it with :func:`build`; readers take its parts with :func:`engine_part`,
:func:`client_part` and :func:`weights_and_config` instead of indexing the keys themselves
(tests/unit/test_layering.py refuses the literal keys elsewhere in the package).
"""

from __future__ import annotations

from typing import Any

ENGINE = "engine"
CLIENT = "client"


def build(engine_state: dict[str, Any], client_state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's state from the engine's part and the trainer's (client) part."""
    return {ENGINE: engine_state, CLIENT: client_state}


def engine_part(state: Any) -> Any:
    """The engine's part of ``state`` (KeyError when missing; None where ``state`` is no dict)."""
    return state[ENGINE] if isinstance(state, dict) else None


def client_part(state: Any) -> Any:
    """The trainer's (client) part of ``state`` (KeyError when missing; None where no dict)."""
    return state[CLIENT] if isinstance(state, dict) else None


def parts(state: Any) -> tuple[Any, Any]:
    """(engine part, client part), None for each one ``state`` lacks (no error: for tools that
    also read bare state_dicts and must tell them apart)."""
    if not isinstance(state, dict):
        return None, None
    return state.get(ENGINE), state.get(CLIENT)


def weights_and_config(state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state_dict, stored run config); KeyError/TypeError when ``state`` lacks either."""
    return state[ENGINE]["model"], state[CLIENT]["config"]
