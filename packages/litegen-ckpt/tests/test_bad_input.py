"""Scenario 6, bad input (see ``tests/bad_input.py``): ``Checkpointer``'s constructor, ``save`` and ``load``,
``export_safetensors`` and ``load_safetensors``; every bad argument is refused naming the argument (a missing
file: ``FileNotFoundError``)."""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import torch
from bad_input import NOT_A_MODULE, SETTINGS, Denoiser, check, junk, probe
from hypothesis import given
from hypothesis import strategies as st


def test_litegen_ckpt():
    from litegen_ckpt import Checkpointer, export_safetensors, load_safetensors

    outcomes: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        a_file = root / "a_file"
        a_file.write_text("x")
        model = Denoiser()
        checkpointer = Checkpointer(root / "ckpt")
        checkpointer.save(0, model=model)

        @SETTINGS
        @given(st.sampled_from(["root", "keep", "async_save", "process_group", "timeout"]), st.data())
        def build_one_bad(name, data):
            value = data.draw(
                {
                    "root": st.one_of(junk(str), st.just(a_file)),
                    "keep": st.one_of(st.integers(max_value=0), junk(int, type(None))),
                    "async_save": junk(bool),
                    "process_group": junk(type(None)),
                    "timeout": st.one_of(junk(type(None)), st.just(datetime.timedelta(seconds=-1))),
                }[name]
            )
            kwargs = {"root": root / "other", name: value}
            probe(outcomes, [name], lambda: Checkpointer(kwargs.pop("root"), **kwargs))

        build_one_bad()

        @SETTINGS
        @given(
            st.sampled_from(["save step", "save stateful", "load step", "fall_back", "load stateful"]),
            st.data(),
        )
        def use_one_bad(what, data):
            if what == "save step":
                step = data.draw(st.one_of(st.integers(max_value=-1), junk(int)))
                probe(outcomes, ["step"], lambda: checkpointer.save(step, model=model))
            elif what == "load step":
                step = data.draw(st.one_of(st.integers(max_value=-1), junk(int, str), st.text(max_size=5)))
                probe(outcomes, ["step"], lambda: checkpointer.load(step, model=model))
            elif what == "fall_back":
                flag = data.draw(junk(bool))
                probe(outcomes, ["fall_back"], lambda: checkpointer.load(fall_back=flag, model=model))
            else:
                value = data.draw(st.one_of(junk(bool), st.just(torch.optim.SGD(model.parameters(), lr=0.1))))
                method = checkpointer.save if what == "save stateful" else checkpointer.load
                args = (1,) if what == "save stateful" else ()
                probe(outcomes, ["thing"], lambda: method(*args, thing=value))

        use_one_bad()

        @SETTINGS
        @given(st.sampled_from(["source", "path", "name", "model", "file", "strict"]), st.data())
        def safetensors_one_bad(name, data):
            if name in ("source", "path", "name"):
                args = {"source": model, "path": root / "out.safetensors", "name": "model"}
                args[name] = data.draw(
                    {
                        "source": st.one_of(junk(str), st.just(str(root / "missing"))),
                        "path": st.one_of(junk(str), st.just(root)),
                        "name": st.one_of(junk(str), st.text(max_size=4).map(lambda s: s + "_")),
                    }[name]
                )
                if name == "name":
                    args["source"] = root / "ckpt"
                probe(
                    outcomes,
                    [name],
                    lambda: export_safetensors(**args),
                    errors=(ValueError, TypeError, FileNotFoundError),
                )  # a missing file: named, as Python does
            else:
                args = {"model": Denoiser(), "path": root / "out.safetensors", "strict": True}
                export_safetensors(args["model"], args["path"])
                value = data.draw(
                    {
                        "model": NOT_A_MODULE,
                        "strict": junk(bool),
                        "file": st.one_of(junk(str), st.binary(max_size=64)),
                    }[name]
                )
                if name == "file":
                    args["path"] = value
                    if isinstance(value, bytes):
                        args["path"] = root / "junk.safetensors"
                        args["path"].write_bytes(value)
                else:
                    args[name] = value
                probe(
                    outcomes,
                    ["path" if name == "file" else name],
                    lambda: load_safetensors(**args),
                    errors=(ValueError, TypeError, FileNotFoundError),
                )

        safetensors_one_bad()
    check(outcomes)
