"""The chunked loss: the model's own loss and LoRA gradients, without ever holding the whole logits."""

import pytest
import torch
from helpers import GUANACO, TINY, TINY_FAMILIES, falcon2_11b_shaped, prepared_datamodule

from lightning_falcon.data.batching import PackedRows
from lightning_falcon.data.source import Source
from lightning_falcon.errors import ConfigError
from lightning_falcon.model.module import FalconQLoRA


@pytest.fixture(scope="module")
def module():
    """The tiny 4-bit model with LoRA as fit builds it (checkpointing on), with an adapter that changes it."""
    torch.manual_seed(0)
    m = FalconQLoRA(TINY, lora_dropout=0.0, gradient_checkpointing=True)
    m.configure_model()
    with torch.no_grad():
        for name, p in m.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return m


def batches(tmp_path) -> dict[str, dict[str, torch.Tensor]]:
    """A padded batch (masked prompts, padding) and a packed one (several examples per row, position_ids)."""
    padded = prepared_datamodule(tmp_path / "padded", batch_size=4)
    packed = prepared_datamodule(tmp_path / "packed", dataset=Source(GUANACO, format="turns"), max_length=512)
    rows = PackedRows(packed._splits["train"], 512)
    multi = [b for b in range(len(rows)) if len(rows.bins[b]) >= 2][:2]
    return {
        "padded": padded.collate([padded._splits["train"][i] for i in range(4)]),
        "packed": packed.collate([rows[b] for b in multi]),
    }


def loss_and_grads(module, batch, chunk):
    module.hparams.loss_chunk_size = chunk
    module.zero_grad(set_to_none=True)
    loss = module.batch_loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_chunked_loss_and_lora_gradients_equal_the_models_own(module, tmp_path):
    for name, batch in batches(tmp_path).items():
        ignored = (batch["labels"] == -100).float().mean().item()
        assert 0.0 < ignored < 1.0, name  # masking takes part
        reference, reference_grads = loss_and_grads(module, batch, None)
        for chunk in (1, 7, 256):
            loss, grads = loss_and_grads(module, batch, chunk)
            # relative: fp32's own spacing at a loss of 8 is 1e-6
            assert loss.item() == pytest.approx(reference.item(), rel=1e-6, abs=0), (name, chunk)
            assert grads.keys() == reference_grads.keys() and grads
            for key, grad in grads.items():
                torch.testing.assert_close(grad, reference_grads[key], atol=1e-6, rtol=0, msg=f"{name} {key}")
        with torch.no_grad():  # validation's path
            module.hparams.loss_chunk_size = 7
            assert module.batch_loss(batch).item() == pytest.approx(reference.item(), rel=1e-6, abs=0)


def largest_saved_for_backward(module, batch, chunk) -> int:
    """The most elements of any tensor autograd keeps for backward during the forward pass."""
    module.hparams.loss_chunk_size = chunk
    largest = 0

    def pack(tensor):
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.batch_loss(batch)
    loss.backward()
    return largest


def test_chunked_loss_never_keeps_the_whole_logits(module, tmp_path):
    batch = batches(tmp_path)["padded"]
    whole = batch["input_ids"].numel() * module.model.config.vocab_size
    assert largest_saved_for_backward(module, batch, None) >= whole - module.model.config.vocab_size
    assert largest_saved_for_backward(module, batch, 16) < whole / 4


def test_bad_chunk_size_is_refused_before_loading():
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        FalconQLoRA(TINY, loss_chunk_size=0)


@pytest.fixture(scope="module")
def family_modules(tmp_path_factory):
    """family -> its tiny 4-bit model with LoRA as fit builds it, with an adapter that changes it."""
    built = {}

    def get(family: str):
        if family not in built:
            path = TINY_FAMILIES.get(family) or str(falcon2_11b_shaped(tmp_path_factory.mktemp(family)))
            torch.manual_seed(0)
            m = FalconQLoRA(path, lora_dropout=0.0, gradient_checkpointing=True)
            m.configure_model()
            with torch.no_grad():
                for name, p in m.model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.05)
            built[family] = m
        return built[family]

    return get


@pytest.mark.parametrize("family", [*TINY_FAMILIES, "falcon2-11b"])
def test_chunked_loss_is_the_models_own_for_an_untied_or_scaled_output(family_modules, family, tmp_path):
    """Falcon2-11B's and Falcon3's output layers are their own weights; Falcon-H1 scales its logits (μP)."""
    module = family_modules(family)
    batch = batches(tmp_path)["padded"]  # the tiny tokenizer's ids, inside every tiny vocabulary
    reference, reference_grads = loss_and_grads(module, batch, None)
    loss, grads = loss_and_grads(module, batch, 7)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6, abs=0)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[key], atol=1e-6, rtol=0, msg=key)
