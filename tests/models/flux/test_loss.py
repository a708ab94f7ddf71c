import torch

from refany3d.models.flux import flow_matching_loss

from .conftest import make_batch, make_model


def test_flow_matching_loss_one_optimisation_step_decreases_it():
    model = make_model(gradient_checkpointing=True)
    batch = make_batch()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    loss = flow_matching_loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    optimizer.step()
    with torch.no_grad():
        after = flow_matching_loss(model, batch, torch.Generator().manual_seed(0))
    assert after < loss.detach() - 1e-4


def test_flow_matching_loss_only_adapters_and_switcher_train():
    model = make_model()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("domain_switcher.") for n in names)
    assert any(".reference." in n for n in names) and any(".domain." in n for n in names)
    assert not any(
        ".domain." in n for n, p in make_model(domain_lora=False).named_parameters() if p.requires_grad
    )


def test_flow_matching_loss_targets_velocity_of_both_branches(monkeypatch):
    model = make_model()
    batch = make_batch()
    loss = flow_matching_loss(model, batch, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.sigmoid(torch.randn(2, generator=g))
    eps = [torch.randn(x.shape, generator=g) for x in (batch.target_rgb, batch.target_point_map)]
    seen = {}
    original = type(model).forward

    def recording(self, **kwargs):
        seen.update(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(type(model), "forward", recording)
    with torch.no_grad():
        again = flow_matching_loss(model, batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, loss.detach())
    torch.testing.assert_close(seen["timestep"], t)
    torch.testing.assert_close(seen["guidance"], torch.ones(2))
    expected = (1 - t)[:, None, None] * batch.target_point_map + t[:, None, None] * eps[1]
    torch.testing.assert_close(seen["target_point_map"], expected)
    out = model(**seen)
    manual = ((out.rgb - (eps[0] - batch.target_rgb)) ** 2).mean()
    manual = manual + ((out.point_map - (eps[1] - batch.target_point_map)) ** 2).mean()
    torch.testing.assert_close(again, manual)


def test_flow_matching_loss_gradients_equal_with_and_without_checkpointing():
    grads = []
    for overrides in (
        {"gradient_checkpointing": False},
        {"gradient_checkpointing": True, "checkpoint_saves_attention": False},
        {"gradient_checkpointing": True, "checkpoint_saves_attention": True},
    ):
        model = make_model(**overrides)
        torch.manual_seed(5)
        for param in model.trainable_parameters():
            torch.nn.init.normal_(param, std=0.05)
        flow_matching_loss(model, make_batch(), torch.Generator().manual_seed(0)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters()]))
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(grads[2], grads[0])
