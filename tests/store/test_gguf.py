"""GGUF control vectors: what we write, read back by the `gguf` package; what llama.cpp conventions mean
on a real forward pass (HF hidden states as the oracle); files written the way repeng and llama.cpp's
cvector-generator write them; round trips; refusals."""

from __future__ import annotations

import contextlib

import gguf
import numpy as np
import pytest
import torch

import repedit
from repedit.io import InputError
from repedit.steering import SiteEdit, UserEdit
from repedit.store.gguf import direction_layer, export_gguf, import_gguf

D = 64


def vec(seed, d=D):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def write_like_repeng(path, model_type, directions, uint32=True):
    """The calls of repeng's ControlVector.export_gguf (vgel/repeng, repeng/extract.py), or, with
    ``uint32=False``, the keys llama.cpp's cvector-generator writes (layer_count as int32)."""
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_type)
    (writer.add_uint32 if uint32 else writer.add_int32)("controlvector.layer_count", len(directions))
    for layer, direction in directions.items():
        writer.add_tensor(f"direction.{layer}", direction)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_written_file_has_exactly_the_llama_cpp_conventions(tiny_model, tmp_path):
    fingerprint = repedit.model_fingerprint(tiny_model("llama"))
    v1, v2, v3 = vec(1), vec(2), vec(3)
    # resid_pre.3 is the output of block 2: it lands on direction.2 together with resid_post.2 (summed).
    edit = UserEdit("emma", [SiteEdit("resid_post.2", "add", vector=v1, a=0.5), SiteEdit("resid_pre.3", "add", vector=v2, a=2.0),
                             SiteEdit("resid_post.1", "add", vector=v3, a=1.0)], fingerprint, D, method="caa")
    result = export_gguf(edit, tmp_path / "emma.gguf", factor=3.0)
    reader = gguf.GGUFReader(str(tmp_path / "emma.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == 2
    assert reader.fields["controlvector.layer_count"].types == [gguf.GGUFValueType.INT32]
    assert {k for k in fields if not k.startswith("repedit.")} == {"general.architecture", "controlvector.model_hint", "controlvector.layer_count"}
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.2"]  # no other tensors
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and list(tensor.shape) == [D]
    data = {t.name: np.asarray(t.data) for t in reader.tensors}
    np.testing.assert_allclose(data["direction.2"], (3.0 * (0.5 * v1 + 2.0 * v2)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(data["direction.1"], (3.0 * v3).numpy(), rtol=1e-6)
    assert result.layers == [1, 2] and result.baked and result.llama_cpp_flag() == f"--control-vector {tmp_path / 'emma.gguf'}"


def test_unbaked_file_leaves_the_strength_to_llama_cpp(tiny_model, tmp_path):
    fingerprint = repedit.model_fingerprint(tiny_model("llama"))
    v = vec(4)
    edit = UserEdit("tom", [SiteEdit("resid_post.1", "add", vector=v, a=0.25), SiteEdit("resid_post.2", "add", vector=-v, a=0.25)], fingerprint, D)
    result = export_gguf(edit, tmp_path / "tom.gguf", factor=2.0, bake=False)
    assert result.scale == 0.5 and result.llama_cpp_flag().endswith("--control-vector-scaled " + str(tmp_path / "tom.gguf") + " 0.5")
    reader = gguf.GGUFReader(str(tmp_path / "tom.gguf"))
    np.testing.assert_array_equal(np.asarray(reader.tensors[0].data), v.numpy())  # unscaled
    back = import_gguf(tmp_path / "tom.gguf")  # the recorded fingerprint is enough for our own files
    assert back.model_fingerprint == fingerprint and [e.a for e in back.edits] == [0.5, 0.5] and back.user_id == "tom"
    mixed = UserEdit("tom", [SiteEdit("resid_post.1", "add", vector=v, a=1.0), SiteEdit("resid_post.2", "add", vector=v, a=2.0)], fingerprint, D)
    with pytest.raises(InputError, match="different strengths"):
        export_gguf(mixed, tmp_path / "x.gguf", bake=False)


def test_refusals_say_why(tiny_model, tmp_path):
    model = tiny_model("llama")
    fingerprint = repedit.model_fingerprint(model)

    def edit(*site_edits, positions="all"):
        return UserEdit("u", list(site_edits), fingerprint, D, positions=positions)

    cases = [
        (edit(SiteEdit("resid_post.1", "project_out", direction=vec(1))), "only additive"),
        (edit(SiteEdit("resid_post.1", "add", vector=vec(1)), SiteEdit("resid_post.2", "chameleon", basis=torch.eye(D)[:2], direction=vec(2))), "only additive"),
        (edit(SiteEdit("resid_post.0", "add", vector=vec(1))), "output of block 0.*rejects direction.0"),
        (edit(SiteEdit("resid_pre.1", "add", vector=vec(1))), "output of block 0"),
        (edit(SiteEdit("resid_pre.0", "add", vector=vec(1))), "embeddings"),
        (edit(SiteEdit("attn_out.1", "add", vector=vec(1))), "inside a block"),
        (edit(SiteEdit("resid_post.1", "add", vector=vec(1)), positions="generated"), "every position"),
        (edit(SiteEdit("resid_post.-1", "add", vector=vec(1))), "pass the model"),
    ]
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            export_gguf(bad, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()
    # With the model, a negative layer resolves: resid_post.-1 of a 3-layer model is direction.2.
    assert export_gguf(edit(SiteEdit("resid_post.-1", "add", vector=vec(1))), tmp_path / "ok.gguf", model=model).layers == [2]
    assert direction_layer("blocks.2.hook_resid_post") == 2 and direction_layer("resid_pre.2") == 1
    other = UserEdit("u", [SiteEdit("resid_post.1", "add", vector=vec(1))], "llama-0000000000000000", D)
    with pytest.raises(InputError, match="not for this model"):
        export_gguf(other, tmp_path / "ok.gguf", model=model)


def test_direction_n_is_added_to_the_output_of_block_n(tiny_model, tokenizer, tmp_path):
    """The llama.cpp convention on a forward pass, observed without repedit's hooks: a file written by hand
    with direction.1 = v moves the input of block 2 (HF hidden_states[2]) by exactly v at every position,
    leaves the input of block 1 alone, and gives the logits of a plain PyTorch hook adding v to block 1's output.
    (HF's own output_hidden_states records a block's output before forward hooks edit it, so the inputs
    are read with pre-hooks here.)"""
    model = tiny_model("llama")
    v = vec(5) * 3
    path = write_like_repeng(tmp_path / "hand.gguf", "llama", {1: v.numpy()})
    edit = import_gguf(path, user_id="hand", model=model)
    assert edit.sites == ["resid_post.1"] and edit.positions == "all" and edit.edits[0].a == 1.0
    ids = torch.tensor([tokenizer("A short text to steer.")["input_ids"]])
    layers = model.model.layers

    def block_inputs(context):
        seen = {}
        handles = [layers[i].register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
                   for i in (1, 2)]
        with torch.no_grad(), context:
            logits = model(ids).logits
        for handle in handles:
            handle.remove()
        return seen, logits

    base, base_logits = block_inputs(contextlib.nullcontext())
    steered, steered_logits = block_inputs(edit.apply(model))
    torch.testing.assert_close(steered[1], base[1], rtol=0, atol=0)
    torch.testing.assert_close(steered[2] - base[2], v.expand_as(base[2]), rtol=1e-5, atol=1e-4)
    plain = layers[1].register_forward_hook(lambda m, args, output: (output[0] + v, *output[1:]) if isinstance(output, tuple) else output + v)
    try:
        with torch.no_grad():
            manual_logits = model(ids).logits
    finally:
        plain.remove()
    torch.testing.assert_close(steered_logits, manual_logits, rtol=1e-5, atol=1e-5)
    assert (steered_logits - base_logits).abs().max() > 1e-2


def test_imports_files_written_like_repeng_and_llama_cpp(tiny_model, tmp_path):
    model = tiny_model("llama")
    fingerprint = repedit.model_fingerprint(model)
    # repeng's default layers run from the last one down (range(-1, -n_layers, -1), normalised): 2, 1.
    repeng_file = write_like_repeng(tmp_path / "repeng.gguf", model.config.model_type, {2: vec(6).numpy(), 1: vec(7).numpy()})
    edit = import_gguf(repeng_file, user_id="rp", model=model)
    assert edit.sites == ["resid_post.1", "resid_post.2"] and edit.model_fingerprint == fingerprint and edit.d_model == D
    torch.testing.assert_close(edit.edits[0].vector, vec(7))
    assert edit.provenance["model_hint"] == "llama" and edit.method == "gguf"
    llama_cpp_file = write_like_repeng(tmp_path / "cvgen.gguf", "llama", {1: vec(8).numpy(), 2: vec(9).numpy()}, uint32=False)
    assert import_gguf(llama_cpp_file, model=model).user_id == "cvgen"  # the file name when no id is recorded
    f64 = write_like_repeng(tmp_path / "f64.gguf", "llama", {1: vec(8).double().numpy()})
    torch.testing.assert_close(import_gguf(f64, model=model).edits[0].vector, vec(8))
    with pytest.warns(UserWarning, match="direction.0"):
        assert import_gguf(write_like_repeng(tmp_path / "zero.gguf", "llama", {0: vec(1).numpy()}), model=model).sites == ["resid_post.0"]
    with pytest.warns(UserWarning, match="model_hint is 'mistral'"):
        import_gguf(write_like_repeng(tmp_path / "hint.gguf", "mistral", {1: vec(1).numpy()}), model=model)
    with pytest.raises(InputError, match="pass the model"):
        import_gguf(repeng_file)


def test_import_refuses_files_llama_cpp_would_refuse(tiny_model, tmp_path):
    model = tiny_model("llama")

    def write(name, arch="controlvector", tensors=None):
        writer = gguf.GGUFWriter(str(tmp_path / name), arch)
        for tensor_name, data in (tensors or {}).items():
            writer.add_tensor(tensor_name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    cases = [
        (write("model.gguf", "llama", {"direction.1": vec(1).numpy()}), "not 'controlvector'"),
        (write("extra.gguf", tensors={"direction.1": vec(1).numpy(), "token_embd.weight": np.ones((4, D), np.float32)}), "not 'direction.N'"),
        (write("twod.gguf", tensors={"direction.1": np.ones((2, D), np.float32)}), "1-D"),
        (write("lengths.gguf", tensors={"direction.1": vec(1).numpy(), "direction.2": vec(2, 32).numpy()}), "different lengths"),
        (write("empty.gguf"), "no direction.N"),
        (write("nan.gguf", tensors={"direction.1": np.full(D, np.nan, np.float32)}), "NaN"),
        (write("small.gguf", tensors={"direction.1": vec(1, 32).numpy()}), "d_model 64"),
        (write("deep.gguf", tensors={"direction.7": vec(1).numpy()}), "beyond the model's 3 layers"),
        (tmp_path / "missing.gguf", "file not found"),
    ]
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    cases.append((tmp_path / "junk.gguf", "not a readable GGUF"))
    for path, message in cases:
        with pytest.raises(InputError, match=message):
            import_gguf(path, model=model)


def test_round_trip_steers_exactly_like_the_original(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    fingerprint = repedit.model_fingerprint(model)
    ids = torch.tensor([tokenizer("Round trip through llama.cpp's format.")["input_ids"]])

    def logits(edit):
        with torch.no_grad(), edit.apply(model):
            return model(ids).logits

    def user(a1, a2):
        return UserEdit("cass", [SiteEdit("resid_post.2", "add", vector=vec(10), a=a1), SiteEdit("resid_pre.2", "add", vector=vec(11), a=a2)],
                        fingerprint, D, method="stylevector")

    # Baked: any strengths. Unbaked: one common strength, restored from the file's recorded scale.
    for original, bake in ((user(1.5, -0.5), True), (user(0.75, 0.75), False)):
        path = export_gguf(original, tmp_path / f"cass-{bake}.gguf", bake=bake).path
        back = import_gguf(path, model=model)
        assert back.sites == ["resid_post.1", "resid_post.2"] and back.method == "stylevector" and back.user_id == "cass"
        torch.testing.assert_close(logits(back), logits(original), rtol=1e-5, atol=1e-5)
        again = export_gguf(back, tmp_path / f"again-{bake}.gguf", bake=bake)
        first, second = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(again.path))
        assert [t.name for t in first.tensors] == [t.name for t in second.tensors]
        for a, b in zip(first.tensors, second.tensors):
            np.testing.assert_allclose(np.asarray(b.data), np.asarray(a.data), rtol=1e-6)
