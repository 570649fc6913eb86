"""ModelProxy: an nn.Module that stands in for another one, transparently.

Pipelines read a denoiser's attributes (``config``, ``dtype``, ``device``), look layers
up in it by name, load weights into it and pick what to do by its class. A proxy
answers all of that with the original model's, so that replacing ``pipe.unet`` by
a proxy changes how calls run and nothing else. What the proxy builds while it runs
(``RUNTIME_STATE`` of a subclass) is its own, and a copy starts without it.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from torch import nn

from asyncfx.integration import MODULE_REGISTRIES


class ModelProxy(nn.Module):
    """Stands in for ``model``: its attributes, modules, parameters, state dict, mode and
    class are the model's; attributes the proxy sets that the model has are set on it.

    Example:
        >>> isinstance(pipe.unet, UNet2DConditionModel), type(pipe.unet).__name__
        (True, 'AsyncDenoiser')
    """

    #: What a subclass builds while it runs; a copy starts without it (``start_runtime_state``).
    RUNTIME_STATE: ClassVar[frozenset[str]] = frozenset()
    #: The subclass's own attributes (set on it even where the model has one of the name).
    OWN_ATTRIBUTES: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)  # read attributes from it; do not own it
        object.__setattr__(self, "__module__", type(model).__module__)  # see __class__

    def start_runtime_state(self) -> None:
        """Set the attributes of RUNTIME_STATE to their state before any call."""

    def __deepcopy__(self, memo: dict) -> ModelProxy:
        """A proxy of a deep copy of the model, with the same options (and hooks), built
        anew at its first call: what this one built belongs to it.

        Example:
            >>> twin = copy.deepcopy(pipe.unet)       # e.g. to load other weights into it
            >>> twin.original_model is pipe.unet.original_model
            False
        """
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self._options(), memo))  # the model, its scheduler, hooks
        twin.start_runtime_state()
        return twin

    def __copy__(self) -> ModelProxy:
        """A proxy of the same model with the same options, built anew at its first call."""
        twin = type(self).__new__(type(self))
        twin.__dict__.update(self._options())
        twin.start_runtime_state()
        return twin

    def _options(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if name not in self.RUNTIME_STATE}

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"an AsyncDenoiser (of {type(self._model).__name__}) cannot be pickled or saved with "
                        "torch.save: it holds worker threads and device streams. Save the model "
                        "(.original_model, or its state_dict()) and the plan (.plan.save(path)), and "
                        "partition again after loading: asyncfx.partition(model, plan=path).")

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The original model's class, as a transparent proxy reports it (``type()`` stays
        the proxy's): libraries that pick what to do by a component's class treat the
        proxy as the model (pipeline-level LoRA calls skip components that are not a
        diffusers ``ModelMixin``; ``pipe.save_pretrained()`` saves the model in its place)."""
        model = self.__dict__.get("_model")
        return type(self) if model is None else type(model)

    def _get_name(self) -> str:
        return type(self).__name__

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_model"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        """An attribute the original model has, and the proxy does not, is set on the model
        (``pipe.unet.encoder_hid_proj = None``, as unloading an adapter does): read through
        the proxy, it is the model's. Others, new ones included, are the proxy's."""
        if name in self.RUNTIME_STATE:  # plain objects set at every call: past nn.Module's bookkeeping
            self.__dict__[name] = value
            return
        model = self.__dict__.get("_model")
        if model is None or self._is_own(name) or not hasattr(model, name):
            super().__setattr__(name, value)
        else:
            setattr(model, name, value)

    def _is_own(self, name: str) -> bool:
        return (name in self.__dict__ or name in self.OWN_ATTRIBUTES
                or hasattr(type(self), name)
                or any(name in self.__dict__.get(registry, ()) for registry in MODULE_REGISTRIES))

    @property
    def dtype(self) -> torch.dtype:
        return self._model.dtype

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def original_model(self) -> nn.Module:
        return self._model

    def named_modules(self, memo: set[nn.Module] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
        """The original model's modules, by their names in it (and so its parameters and
        buffers): pipelines look layers up by name (to set attention processors)."""
        return self._model.named_modules(memo, prefix, remove_duplicate)

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        """The original model's children (and so ``children()``), as ``named_modules``."""
        return self._model.named_children()

    def apply(self, fn: Callable[[nn.Module], None]) -> ModelProxy:
        """Apply ``fn`` to the original model's modules."""
        self._model.apply(fn)
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The original model's state dict, under its own keys (what ``pipe.unet.state_dict()``
        and peft's ``get_peft_model_state_dict(pipe.unet)`` save).

        Example:
            >>> pipe.unet.state_dict().keys() == unet.state_dict().keys()
            True
        """
        return self._model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """Load into the original model."""
        return self._model.load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> ModelProxy:
        """Set the original model's mode."""
        self._model.train(mode)
        self.training = mode
        return self
