"""SamaTrainingModule: batches of frames -> loss parts, gradients, precomputed inputs, learning."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sama import synthetic  # noqa: E402
from sama.losses import LossConfig, TimestepSamplerConfig  # noqa: E402
from sama.models import build_model  # noqa: E402
from sama.models.training import (  # noqa: E402
    SamaBatch,
    SamaTrainingModule,
    TrainingModuleConfig,
    null_prompt,
)


def _pair(num_frames=17, size=64, seed=3):
    scene = synthetic.random_scene(seed)
    edited, instruction = synthetic.make_edit(scene, "recolor", seed)
    source = synthetic.render(scene, num_frames, 24.0, size, size)
    target = synthetic.render(edited, num_frames, 24.0, size, size)
    return source, target, f"[Video edit] {instruction}"


def _module(config: TrainingModuleConfig | None = None, seed: int = 0) -> SamaTrainingModule:
    torch.manual_seed(seed)
    return SamaTrainingModule(build_model("tiny"), config)


def test_gradients_reach_projector_and_head_but_not_frozen_encoders():
    module = _module(TrainingModuleConfig(text_dropout_prob=0.0)).train()
    source, target, prompt = _pair()
    batch = SamaBatch(prompts=[prompt, prompt], target=np.stack([target] * 2), source=np.stack([source] * 2))
    out = module(batch, torch.Generator().manual_seed(0))
    assert out.loss_sem is not None
    assert torch.allclose(out.loss, out.loss_fm + 0.1 * out.loss_sem)
    out.loss.backward()
    transformer = module.transformer
    for name, param in [
        ("projector", transformer.semantic_projector.fc1.weight),
        ("head", transformer.semantic_head.proj.weight),
        ("type embedding", transformer.type_embedding.weight),
        ("patch embedding", transformer.patch_embedding.weight),
    ]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # Every type row (source, semantic, target) is used and so gets a gradient.
    assert (transformer.type_embedding.weight.grad.abs().sum(1) > 0).all()
    trainable = {id(p) for p in module.trainable_parameters()}
    assert trainable == {id(p) for p in transformer.parameters()}
    for frozen in (module.text_encoder, module.semantic_encoder, module.vae):
        for param in frozen.parameters():
            assert not param.requires_grad and param.grad is None and id(param) not in trainable
    assert not module.semantic_encoder.training and not module.text_encoder.training


def test_precomputed_inputs_give_the_same_loss_as_frames():
    module = _module(TrainingModuleConfig(text_dropout_prob=0.0)).eval()
    source, target, prompt = _pair()
    batch = SamaBatch(prompts=[prompt], target=target[None], source=source[None])
    encoded = module.encode_batch(batch, torch.Generator().manual_seed(5))
    from_frames = module.compute_loss(encoded, torch.Generator().manual_seed(1))
    precomputed = SamaBatch(
        prompts=[prompt],
        target_latents=encoded.target_latents,
        source_latents=encoded.source_latents,
        text_embeds=encoded.text_embeds,
        semantic_tokens=encoded.semantic_tokens,
    )
    again = module(precomputed, torch.Generator().manual_seed(1))
    assert torch.equal(from_frames.loss, again.loss)
    assert encoded.target_latents.shape == (1, 48, 5, 32, 32)
    assert encoded.semantic_tokens.shape == (1, 65, 32)


def test_speed_source_image_and_text_to_video_batches():
    module = _module().train()
    source, target, prompt = _pair()
    gen = torch.Generator().manual_seed(0)
    # Speed perturbation: the source has 9 frames, the target 17.
    speed = module(SamaBatch(prompts=[prompt], target=target[None], source=source[None, ::2][:, :9]), gen)
    # Image edit pair: one frame each.
    image = module(
        SamaBatch(
            prompts=[prompt, prompt], target=np.stack([target[:1]] * 2), source=np.stack([source[:1]] * 2)
        ),
        gen,
    )
    # Text-to-video sample: no source.
    t2v = module(SamaBatch(prompts=["a red ball rolls"], target=target[None]), gen)
    for out in (speed, image, t2v):
        assert torch.isfinite(out.loss) and out.loss_sem is not None
    off = SamaTrainingModule(module_components_without_semantic(), TrainingModuleConfig())
    no_sem = off(SamaBatch(prompts=[prompt], target=target[None], source=source[None]), gen)
    assert no_sem.loss_sem is None and torch.equal(no_sem.loss, no_sem.loss_fm)


def module_components_without_semantic():
    from sama.models import get_preset

    config = get_preset("tiny")
    config.semantic.enabled = False
    torch.manual_seed(0)
    components = build_model(config)
    assert components.semantic_encoder is None and components.transformer.semantic_head is None
    return components


def test_caption_dropout_uses_the_null_prompt():
    assert null_prompt("[Video edit] make it red") == "[Video edit]"
    assert null_prompt("a ball rolls") == ""
    module = _module(TrainingModuleConfig(text_dropout_prob=1.0)).train()
    _, target, prompt = _pair()
    encoded = module.encode_batch(SamaBatch(prompts=[prompt, "a ball"], target=np.stack([target] * 2)))
    assert encoded.prompts == ["[Video edit]", ""]
    expected = module.text_encoder.encode(["[Video edit]", ""], allow_empty=True)
    assert torch.equal(encoded.text_embeds, expected)
    # An encoded batch handed to forward is used as is: no second encoding or dropout.
    kept = module.encode_batch(SamaBatch(prompts=[prompt], target=target[None]))
    assert kept.encoded and module.encode_batch(kept) is kept
    # Evaluation never drops.
    module.eval()
    assert module.encode_batch(SamaBatch(prompts=[prompt], target=target[None])).prompts == [prompt]


def test_empty_prompt_is_refused():
    module = _module(TrainingModuleConfig(text_dropout_prob=0.0))
    _, target, _ = _pair()
    with pytest.raises(ValueError, match="empty"):
        module(SamaBatch(prompts=["  "], target=target[None]))


def test_tiny_model_learns_one_pair():
    """AdamW on one synthetic edit pair: the loss on fixed (t, noise) draws drops substantially."""
    config = TrainingModuleConfig(
        loss=LossConfig(timesteps=TimestepSamplerConfig(kind="uniform")), text_dropout_prob=0.0
    )
    module = _module(config, seed=1)
    source, target, prompt = _pair(num_frames=9, size=32)
    encoded = module.encode_batch(SamaBatch(prompts=[prompt], target=target[None], source=source[None]))

    def evaluate() -> float:
        module.eval()
        with torch.no_grad():
            losses = [
                module.compute_loss(encoded, torch.Generator().manual_seed(100 + i)).loss for i in range(8)
            ]
        module.train()
        return float(torch.stack(losses).mean())

    before = evaluate()
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        optimizer.zero_grad()
        module.compute_loss(encoded, gen).loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.5 * before, (before, after)
