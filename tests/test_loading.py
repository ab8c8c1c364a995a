"""Loading model files: the allowlist, the ways on for other pickles, archives, and broken files."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from tests.model_zoo import CustomNet, yat_mlp
from yatdeploy.errors import ModelLoadError
from yatdeploy.exporting import ExportOptions, export_model
from yatdeploy.loading import (
    EXPORTED_PROGRAM,
    PICKLED_MODULE,
    STATE_DICT,
    TORCHSCRIPT,
    load_model,
)
from yatdeploy.validation import validate


def test_a_whole_module_of_torch_nn_and_nmn_layers_loads_without_flags(save_whole):
    model = yat_mlp({"constant_alpha": True, "learnable_epsilon": True})
    loaded = load_model(save_whole(model))
    assert loaded.format == PICKLED_MODULE and loaded.layers_are_identifiable
    assert not loaded.module.training
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x))


def test_the_legacy_non_zip_format(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(yat_mlp(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelLoadError, match="legacy .*trust_pickle=True"):
        load_model(path)
    assert load_model(path, trust_pickle=True).format == PICKLED_MODULE
    torch.save(yat_mlp().state_dict(), path, _use_new_zipfile_serialization=False)
    assert load_model(path, arch="tests.model_zoo:build_mlp").format == STATE_DICT


def test_a_user_class_is_refused_and_the_ways_on_are_named(save_whole):
    path = save_whole(CustomNet())
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    message = str(info.value)
    assert "tests.model_zoo.CustomNet" in message
    assert "trust_pickle=True" in message and "`arch`" in message


def test_trust_pickle_loads_a_user_class(save_whole):
    loaded = load_model(save_whole(CustomNet()), trust_pickle=True)
    assert isinstance(loaded.module, CustomNet)


class _Payload:
    """Unpickling this would create a file: the allowlist must stop it before it runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_malicious_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(1), "payload": _Payload(str(marker))}, path)
    with pytest.raises(ModelLoadError, match="not a torch.nn or nmn layer"):
        load_model(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(ModelLoadError):
        load_model(path)
    assert not marker.exists()


def test_a_state_dict_needs_arch(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(yat_mlp().state_dict(), path)
    with pytest.raises(ModelLoadError, match="state_dict.*`arch`"):
        load_model(path)


def test_a_state_dict_with_arch_loads_the_weights(tmp_path):
    model = yat_mlp()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch="tests.model_zoo:build_mlp")
    assert loaded.format == STATE_DICT
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value)


def test_a_state_dict_that_does_not_fit_arch_names_the_keys(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(yat_mlp().state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, arch="tests.model_zoo:build_wrong_mlp")
    message = str(info.value)
    assert "unexpected keys" not in message or "5.weight" not in message
    assert "missing keys: 5.bias, 5.weight" in message
    assert "shape mismatch: 0.bias (file (12,), `arch` (10,))" in message


@pytest.mark.parametrize(
    "arch,message",
    [
        ("no_colon", "expected 'module:callable'"),
        ("tests.no_such_module:build", "cannot import"),
        ("tests.model_zoo:missing", "has no attribute"),
        ("tests.model_zoo:YATNMN_OPTIONS", "not callable"),
    ],
)
def test_bad_arch_values_are_explained(tmp_path, arch, message):
    path = tmp_path / "weights.pt"
    torch.save(yat_mlp().state_dict(), path)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path, arch=arch)


def test_a_torchscript_archive_exports_and_validates(tmp_path, progress):
    model = yat_mlp()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(2, 16)), path)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.format == TORCHSCRIPT and not loaded.layers_are_identifiable
    result = export_model(loaded, tmp_path / "m.onnx", ExportOptions((1, 16)), progress)
    assert result.yat_gemm_nodes == 0 and "torch.save(model)" in result.notes[0]
    report = validate(tmp_path / "m.onnx", loaded)
    assert report.passed, report.failures()


@pytest.mark.slow
def test_a_torch_export_program_exports_and_validates(tmp_path, progress):
    model = yat_mlp()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(2, 16),), dynamic_shapes=({0: batch},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = load_model(path)
    assert loaded.format == EXPORTED_PROGRAM
    export_model(loaded, tmp_path / "m.onnx", ExportOptions((2, 16)), progress)
    report = validate(tmp_path / "m.onnx", loaded)
    assert report.passed, report.failures()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "not a PyTorch model file"),
        (b"hello, this is text\n", "not a PyTorch model file"),
        (b"PK\x03\x04 truncated zip", "not a PyTorch model file"),
    ],
)
def test_files_that_are_not_models_are_named(tmp_path, content, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_a_truncated_model_file_is_called_corrupt(save_whole):
    path = save_whole(yat_mlp())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt|not a PyTorch model file"):
        load_model(path)


def test_a_zip_that_no_torch_function_wrote_is_named(tmp_path):
    import zipfile

    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadError, match="not one written by torch.save"):
        load_model(path)


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "absent.pt")
    with pytest.raises(ModelLoadError, match="not a file"):
        load_model(tmp_path)


def test_a_pickle_of_something_else_is_named(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelLoadError, match="holds a list"):
        load_model(path)


# --- files that would run their own code, and damaged files --------------------------------------------


class _Marker:
    """A pickle that, when unpickled in full, creates the file `path`: proof that the file's code ran."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _saved_program(tmp_path, name: str = "model.pt2"):
    program = torch.export.export(yat_mlp(), (torch.randn(2, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    path = tmp_path / name
    torch.export.save(program, path)
    return path


def _rewrite_archive(path, change) -> None:
    """Rewrite a zip archive entry by entry through `change(name, data) -> data`, with valid CRCs."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            archive.writestr(info, change(info.filename, data))


def _pickled(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _pickle_a_weight(marker):
    import json

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return _pickled(_Marker(marker))
        return data

    return change


def _pickle_the_sample_inputs(marker):
    def change(name: str, data: bytes) -> bytes:
        return _pickled(_Marker(marker)) if name.endswith("data/sample_inputs/model.pt") else data

    return change


def _add_a_custom_object(marker):
    import json

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("_constants_config.json"):
            config = json.loads(data)
            config["config"]["hidden"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": False,
                                          "tensor_meta": None}
            return json.dumps(config).encode()
        return data

    return change


@pytest.mark.parametrize(
    "tamper,found",
    [
        (_pickle_a_weight, r"weight '0.weight' \(pickled"),
        (_pickle_the_sample_inputs, r"sample_inputs/model.pt \(a pickle that needs full unpickling\)"),
        (_add_a_custom_object, r"constant 'hidden' \(a custom object"),
    ],
    ids=["pickled-weight", "pickled-sample-inputs", "custom-object"],
)
@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
def test_a_torch_export_archive_that_would_run_code_is_refused(tmp_path, tamper, found, suffix):
    marker = tmp_path / "code-ran"
    path = _saved_program(tmp_path, "model" + suffix)
    _rewrite_archive(path, tamper(marker))
    with pytest.raises(ModelLoadError, match=found) as caught:
        load_model(path)
    assert "trust_pickle=True" in str(caught.value) and "`arch`" in str(caught.value)
    assert not marker.exists()


def test_an_aotinductor_library_in_a_program_archive_is_refused(tmp_path):
    import zipfile

    path = _saved_program(tmp_path)

    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("model/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ModelLoadError, match="AOTInductor compiled code"):
        load_model(path)


@pytest.mark.slow
def test_export_and_validate_refuse_a_program_that_would_run_code(tmp_path, save_whole, capsys):
    from yatdeploy.cli import EXIT_USAGE, main

    marker = tmp_path / "code-ran"
    evil = _saved_program(tmp_path, "evil.pt2")
    _rewrite_archive(evil, _pickle_a_weight(marker))
    assert main(["export", "-q", str(evil), "-o", str(tmp_path / "e.onnx"), "--input-shape", "2,16"]) == EXIT_USAGE
    good = save_whole(yat_mlp())
    assert main(["export", "-q", str(good), "-o", str(tmp_path / "g.onnx"), "--input-shape", "2,16",
                 "--no-validate"]) == 0
    capsys.readouterr()
    assert main(["validate", "-q", str(tmp_path / "g.onnx"), "--against", str(evil)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loading it would run code from the file" in err[0]
    assert not marker.exists() and not (tmp_path / "e.onnx").exists()


def test_a_plain_program_archive_still_loads_without_flags(tmp_path):
    path = _saved_program(tmp_path)
    loaded = load_model(path)
    assert loaded.format == EXPORTED_PROGRAM
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded.module(x), torch.export.load(str(path)).module()(x))


def test_a_torchscript_archive_needs_trust(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(yat_mlp(), torch.randn(2, 16)), path)
    with pytest.raises(ModelLoadError, match="TorchScript archive, whose code runs when the model runs") as caught:
        load_model(path)
    assert "trust_pickle=True" in str(caught.value)
    assert load_model(path, trust_pickle=True).format == TORCHSCRIPT


def _flip_a_weight_byte(path, weight: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(weight.detach().numpy().tobytes()[:32])
    assert at > 0
    data[at + 5] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["module", "state_dict", "program", "torchscript"])
def test_a_damaged_archive_fails_its_crc_check(tmp_path, save_whole, kind):
    model = yat_mlp()
    weight = model[0].weight
    path = tmp_path / "model.pt"
    if kind == "module":
        torch.save(model, path)
    elif kind == "state_dict":
        torch.save(model.state_dict(), path)
    elif kind == "program":
        torch.export.save(torch.export.export(model, (torch.randn(2, 16),)), path)
    else:
        torch.jit.save(torch.jit.trace(model, torch.randn(2, 16)), path)
    _flip_a_weight_byte(path, weight)
    with pytest.raises(ModelLoadError, match="fails its CRC-32 check"):
        load_model(path, arch="tests.model_zoo:build_mlp" if kind == "state_dict" else None, trust_pickle=True)


def test_export_of_a_damaged_file_exits_2(tmp_path, save_whole, capsys):
    from yatdeploy.cli import EXIT_USAGE, main

    model = yat_mlp()
    path = save_whole(model)
    _flip_a_weight_byte(path, model[0].weight)
    assert main(["export", "-q", str(path), "--input-shape", "1,16"]) == EXIT_USAGE
    assert "CRC-32" in capsys.readouterr().err


# --- as people save: wrapped state_dicts, training checkpoints, classes of their own -----------------------

ARCH = "tests.model_zoo:build_mlp"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_a_state_dict_saved_through_ddp_or_torch_compile_loads(tmp_path, prefix):
    state = {prefix + k: v for k, v in yat_mlp().state_dict().items()}
    torch.save(state, tmp_path / "wrapped.pt")
    loaded = load_model(tmp_path / "wrapped.pt", arch=ARCH)
    for key, value in yat_mlp().state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)


def test_a_training_checkpoint_loads_with_its_state_key_and_says_so_without(tmp_path):
    model = yat_mlp()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    torch.save({"epoch": 3, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(ModelLoadError, match=r"a training checkpoint \(keys 'epoch', 'model', 'optimizer'\).*"
                                             r"pass `state_key` NAME .*e.g. `state_key` model"):
        load_model(tmp_path / "ckpt.pt", arch=ARCH)
    loaded = load_model(tmp_path / "ckpt.pt", arch=ARCH, state_key="model")
    assert torch.equal(loaded.module[0].weight, model[0].weight)
    with pytest.raises(ModelLoadError, match="no key 'weights' .*epoch, model, optimizer"):
        load_model(tmp_path / "ckpt.pt", arch=ARCH, state_key="weights")


@pytest.mark.slow
def test_a_checkpoint_holding_a_whole_module_loads_through_the_cli(tmp_path, capsys):
    from yatdeploy.cli import EXIT_OK, main

    torch.save({"model": yat_mlp(), "step": 10}, tmp_path / "ckpt.pt")
    assert main(["export", "-q", str(tmp_path / "ckpt.pt"), "-o", str(tmp_path / "m.onnx"), "--input-shape", "1,16",
                 "--state-key", "model"]) == EXIT_OK
    assert "PASSED" in capsys.readouterr().out


@pytest.mark.slow
def test_a_class_from_a_module_in_the_current_folder_loads_with_trust(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\nfrom nmn.torch import YatNMN\n\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.yat = YatNMN(4, 3)\n\n"
        "    def forward(self, x):\n        return self.yat(x)\n")
    script = ("import sys, torch; sys.path.insert(0, '.'); import my_models; "
              "torch.save(my_models.Net(), 'net.pt')")
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    loaded = load_model(tmp_path / "net.pt", trust_pickle=True)
    assert type(loaded.module).__name__ == "Net"


@pytest.mark.slow
def test_a_class_defined_in_the_training_scripts_main_gets_a_way_on(tmp_path):
    script = ("import torch\nfrom nmn.torch import YatNMN\n\n"
              "class Net(torch.nn.Module):\n"
              "    def __init__(self):\n        super().__init__()\n        self.yat = YatNMN(4, 3)\n\n"
              "torch.save(Net(), 'net.pt')\n")
    (tmp_path / "train.py").write_text(script)
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, check=True)
    with pytest.raises(ModelLoadError, match=r"class Net was defined in the training script itself \(its __main__\)"
                                             r".*move the class into a module"):
        load_model(tmp_path / "net.pt", trust_pickle=True)
