"""Sites and methods on the models users bring: Hugging Face transformers built from config
(no download) and torch's own nn.TransformerEncoderLayer. Every ReLU site of an MLP block is
paired with the right producer and consumers; dead counts match a brute-force count; ReDo,
Synaptic Stripping and NNrelief act on the right weights with dict batches; a model whose
wiring cannot be proven is refused, never acted on wrongly."""
import pytest
import torch
import torch.nn as nn

import dormant
from dormant.methods import build
from dormant.sites import is_conv1d

tf = pytest.importorskip("transformers")

B, T, V = 6, 8, 100


pytestmark = pytest.mark.usefixtures("no_fx_warning")


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_act="relu", num_labels=3)
    blocks = [(f"bert.encoder.layer.{i}.intermediate.dense", f"bert.encoder.layer.{i}.output.dense")
              for i in range(2)]
    return tf.BertForSequenceClassification(cfg), _ids(), blocks


def gpt2():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, activation_function="relu",
                        bos_token_id=0, eos_token_id=0)
    blocks = [(f"transformer.h.{i}.mlp.c_fc", f"transformer.h.{i}.mlp.c_proj") for i in range(2)]
    return tf.GPT2LMHeadModel(cfg), {"input_ids": _ids()["input_ids"]}, blocks


def vit():
    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       hidden_act="relu", num_labels=3)
    blocks = [(f"vit.layers.{i}.mlp.fc1", f"vit.layers.{i}.mlp.fc2") for i in range(2)]
    x = torch.randn(B, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return tf.ViTForImageClassification(cfg), {"pixel_values": x}, blocks


def resnet():
    torch.manual_seed(0)
    cfg = tf.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", hidden_act="relu", num_labels=3)
    s = "resnet.encoder.stages"
    # (producer, consumers) of the block-internal ReLU and of the ReLU after the residual sum
    blocks = [(f"{s}.0.layers.0.layer.0.convolution", f"{s}.0.layers.0.layer.1.convolution"),
              (f"{s}.1.layers.0.layer.0.convolution", f"{s}.1.layers.0.layer.1.convolution")]
    x = torch.randn(B, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return tf.ResNetForImageClassification(cfg), {"pixel_values": x}, blocks


MODELS = {"bert": bert, "gpt2": gpt2, "vit": vit, "resnet": resnet}


def _by_producer(sites):
    return {s.producer: s for s in sites if s.activation == "relu"}


@pytest.mark.parametrize("name", MODELS)
def test_every_mlp_block_relu_has_the_right_producer_and_consumers(name):
    model, batch, blocks = MODELS[name]()
    sites = _by_producer(dormant.find_sites(model, batch))
    for producer, consumer in blocks:
        site = sites[producer]
        assert site.consumers == (consumer,) and site.consumers_complete
        assert site.proof == "dataflow" and not site.residual
        assert site.num_units == dormant.sites.out_units(model.get_submodule(producer))


@pytest.mark.parametrize("make, act, kind", [
    (bert, "gelu", "gelu"), (gpt2, "gelu_new", "gelu_tanh"), (gpt2, "relu2", "relu_squared")])
def test_stock_transformers_activations_are_sites(make, act, kind):
    """transformers' own activation modules (GPT-2's default gelu_new, BERT's gelu, ...) are
    sites of their MLP blocks, found without importing transformers in dormant."""
    model, batch, blocks = make()
    cfg = model.config
    cfg.update({"hidden_act": act} if hasattr(cfg, "hidden_act") else
               {"activation_function": act})
    torch.manual_seed(0)
    model = type(model)(cfg)
    sites = {s.producer: s for s in dormant.find_sites(model, batch)}
    for producer, consumer in blocks:
        site = sites[producer]
        assert site.activation == kind and site.consumers == (consumer,)
        assert site.consumers_complete and site.proof == "dataflow"
    assert dormant.sites.is_nonneg(kind) == (kind == "relu_squared")
    mlp = [sites[producer] for producer, _ in blocks]
    with dormant.ActivityMonitor(model, mlp) as mon:
        model(**batch)
    for s in mon.stats().values():      # every token of every sample counted
        assert s.positions == B * T and s.samples == B and (s.zeros < s.positions).all()


def test_resnet_residual_relu_is_paired_with_the_main_branch_not_the_shortcut():
    model, batch, _ = resnet()
    s = "resnet.encoder.stages"
    site = _by_producer(dormant.find_sites(model, batch))[f"{s}.0.layers.0.layer.1.convolution"]
    assert site.residual and site.norm == f"{s}.0.layers.0.layer.1.normalization"
    assert site.consumers == (f"{s}.1.layers.0.layer.0.convolution",
                              f"{s}.1.layers.0.shortcut.convolution")


def _kill(model, site, units):
    """Drive `units` of `site` below zero for every input (bias, or BN offset and scale)."""
    with torch.no_grad():
        if site.norm is not None:
            norm = model.get_submodule(site.norm)
            norm.weight[units] = 0.0
            norm.bias[units] = -1e4
        else:
            model.get_submodule(site.producer).bias[units] = -1e4


def _brute_force_dead(model, site, batch):
    """Never-positive units, from the activation module's own output (hook, eval, no grad)."""
    out = []
    h = model.get_submodule(site.act_module).register_forward_hook(lambda m, i, o: out.append(o))
    model.eval()
    with torch.no_grad():
        model(**batch)
    h.remove()
    y = torch.cat(out).movedim(site.unit_dim, -1).flatten(0, -2)
    return ~(y > 0).any(0)


@pytest.mark.parametrize("name", MODELS)
def test_dead_counts_after_killing_units_match_brute_force(name):
    model, batch, blocks = MODELS[name]()
    sites = _by_producer(dormant.find_sites(model, batch))
    site = sites[blocks[0][0]]
    _kill(model, site, [1, 3, 5])
    report = dormant.diagnose(model, [batch])
    for s in sites.values():
        assert torch.equal(report.dead[s.name], _brute_force_dead(model, s, batch)), s.name
    assert report.dead[site.name][[1, 3, 5]].all()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_layer_with_relu_by_name(mode):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, activation="relu", batch_first=True)
    getattr(layer, mode)()
    x = torch.randn(B, 5, 16)
    sites = dormant.find_sites(layer, x)
    assert [(s.producer, s.consumers, s.activation) for s in sites] == [("linear1", ("linear2",),
                                                                         "relu")]
    with torch.no_grad():
        layer.linear1.bias[[0, 2]] = -1e4
    report = dormant.diagnose(layer, x, sites=sites)    # eval + no_grad: the fast path is off
    assert report.samples == B
    pre = []
    h = layer.linear1.register_forward_hook(lambda m, i, o: pre.append(o))
    with torch.no_grad(), dormant.dataflow.no_fastpath():
        layer.eval()(x)
    h.remove()
    assert torch.equal(report.dead[sites[0].name], ~(pre[0] > 0).flatten(0, 1).any(0))
    assert layer.training is False and torch.backends.mha.get_fastpath_enabled()
    layer.train()
    with dormant.ActivityMonitor(layer, sites, every_steps=1, mode="train") as mon:
        layer(x).sum().backward()
        mon.step()
    assert mon.observed and mon.stats()[sites[0].name].samples == B


def _forward(model, batch):
    return model(**{k: v for k, v in batch.items() if k != "labels"})


def _method_on(name, make, **options):
    model, batch, blocks = make()
    sites = _by_producer(dormant.find_sites(model, batch))
    site = sites[blocks[0][0]]
    _kill(model, site, [2, 7])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    method = build(name, **options).prepare(model, opt, probe=[batch], forward=_forward)
    return model, batch, blocks[0], method, method.sites[[s.name for s in method.sites].index(site.name)]


@pytest.mark.parametrize("make", [bert, gpt2], ids=["bert", "gpt2"])
def test_redo_revives_killed_units_and_zeroes_their_outgoing_weights(make):
    model, batch, (producer, consumer), method, site = _method_on("redo", make, tau=0.0)
    result = method.end_epoch()
    assert result["redo/recycled"] >= 2
    cons = model.get_submodule(consumer)
    w = cons.weight.t() if is_conv1d(cons) else cons.weight          # (out, in)
    assert (w[:, [2, 7]] == 0).all() and (w[:, [0, 1]] != 0).any()
    assert not dormant.diagnose(model, [batch], sites=[site]).dead[site.name][[2, 7]].any()


@pytest.mark.parametrize("make", [bert, gpt2], ids=["bert", "gpt2"])
def test_synaptic_stripping_strips_the_dead_units_incoming_weights_only(make):
    model, batch, (producer, _), method, site = _method_on("synaptic-stripping", make,
                                                          factor=0.2)
    prod = model.get_submodule(producer)
    before = dormant.units.as_rows(prod, prod.weight).detach().clone()     # (units, fan_in)
    result = method.end_epoch()
    assert result["ss/dead_units"] >= 2 and result["ss/stripped"] > 0
    rows = dormant.units.as_rows(prod, method.masks.masks[f"{producer}.weight"])
    dead = method.observe().dead_units()[site.name] | torch.isin(
        torch.arange(site.num_units), torch.tensor([2, 7]))
    assert rows[~dead].all()                      # live units untouched
    for u in (2, 7):                              # the most negative 20% of a dead unit go
        t = torch.quantile(before[u].double(), 0.2)
        assert torch.equal(~rows[u], before[u].double() < t)


@pytest.mark.parametrize("make", [bert, gpt2], ids=["bert", "gpt2"])
def test_nnrelief_drops_dead_units_whole_on_their_own_axis(make):
    model, batch, (producer, _), method, site = _method_on(
        "nnrelief", make, rounds=1, epochs_per_round=1, keep_best=False, rewind="none")
    result = method.end_epoch()
    assert result.new_round
    prod = model.get_submodule(producer)
    rows = dormant.units.as_rows(prod, method.masks.masks[f"{producer}.weight"])
    assert not rows[[2, 7]].any() and rows.any(1).sum() > 2
    assert not method.masks.masks[f"{producer}.bias"][[2, 7]].any()


class ChannelsLast(nn.Module):
    """Conv -> ReLU -> permute to channels-last -> flatten -> Linear: the Linear reads the
    units interleaved in an order no rule proves, so the site's consumers are unknown."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Linear(64, 2)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).permute(0, 2, 3, 1).flatten(1))


@pytest.mark.parametrize("trace", ["fx", "dataflow"])
def test_a_wiring_that_cannot_be_proven_is_refused(trace):
    model = ChannelsLast()
    x = torch.randn(4, 1, 4, 4)
    (site,) = dormant.find_sites(model, x, trace=trace)
    assert site.producer == "conv" and not site.consumers_complete and site.consumers == ()
    assert " ?" in dormant.format_sites([site])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert site.readers == ("permute",)          # the refusal names the reading operation
    with pytest.raises(ValueError, match=r"redo rewrites the outgoing weights .* site\(s\) "
                                         r"act \(read by permute\)"):
        build("redo").prepare(model, opt, probe=x)
    build("synaptic-stripping").prepare(model, opt, probe=x)   # incoming only: allowed


class NoProducer(nn.Module):
    """A ReLU fed by a matmul with a free parameter: no layer owns its incoming weights."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.act, self.head = nn.ReLU(), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.act(x @ self.w))


def test_a_site_without_a_producer_is_left_alone_and_a_method_with_no_site_refuses():
    model = NoProducer()
    x = torch.randn(4, 6)
    (site,) = dormant.find_sites(model, x)
    assert site.producer is None and site.consumers == ("head",)
    # the only site has no producer: the method would do nothing, so it refuses
    with pytest.raises(ValueError, match=r"synaptic-stripping: no site of NoProducer has a "
                                         r"Linear/Conv layer feeding it .*\['act'\]"):
        build("synaptic-stripping").prepare(model, None, probe=x)
    # beside a site it can act on, the producer-less one is left alone with a warning
    both = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), NoProducer())
    with pytest.warns(UserWarning, match=r"synaptic-stripping: site\(s\) \['2.act'\] are left "
                                         "alone: no Linear/Conv layer feeds them"):
        method = build("synaptic-stripping").prepare(both, None, probe=x)
    assert [s.name for s in method.sites] == ["1"]


def test_unknown_activation_kinds_are_listed():
    with pytest.raises(ValueError, match=r"unknown activation kind\(s\) \['rleu'\]; kinds: .*relu"):
        dormant.find_sites(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), torch.randn(1, 2),
                           activations=["rleu"])


NORM_BEFORE = {"bert": "bert.encoder.layer.0.attention.output.LayerNorm",
               "gpt2": "transformer.h.0.ln_2"}


@pytest.mark.parametrize("make", [bert, gpt2], ids=["bert", "gpt2"])
def test_synaptic_stripping_revives_a_unit_held_down_by_one_weight(make):
    """Input feature 0 of the MLP block is made always positive (its LayerNorm offset), and
    units 2 and 7 read it through one large negative weight: dead. Stripping the most
    negative 20% of their weights removes that one, and they fire again."""
    model, batch, blocks = make()
    producer = blocks[0][0]
    prod = model.get_submodule(producer)
    rows = dormant.units.as_rows(prod, prod.weight)          # a view on the weight
    with torch.no_grad():
        model.get_submodule(NORM_BEFORE[make.__name__]).bias[0] = 10.0
        rows[[2, 7], 0] = -5.0
        prod.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    method = build("synaptic-stripping", factor=0.2).prepare(model, opt, probe=[batch],
                                                              forward=_forward)
    site = _by_producer(method.sites)[producer]
    assert method.observe().dead_units()[site.name][[2, 7]].all()
    method.end_epoch()
    assert (rows[[2, 7], 0] == 0).all()
    assert not method.observe().dead_units()[site.name][[2, 7]].any()


def test_redo_acts_on_mobilenet_v2_with_tf_padding():
    """HF MobileNetV2 pads (F.pad, tf_padding=True by default) between every unit and its
    consumer: the pad keeps the channel axis, so every site's consumers are known."""
    torch.manual_seed(0)
    cfg = tf.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=3)
    assert cfg.tf_padding
    model = tf.MobileNetV2ForImageClassification(cfg)
    x = {"pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    sites = dormant.find_sites(model, x)
    assert all(s.consumers_complete for s in sites) and len(sites) == 35
    s = "mobilenet_v2.layer.2"
    with torch.no_grad():    # unit 5 of an expansion: its BatchNorm offset holds it at 0
        model.get_submodule(f"{s}.expand_1x1.normalization").bias[5] = -100.0
    conv = model.get_submodule(f"{s}.expand_1x1.convolution").weight
    before = conv.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = build("redo", tau=0.0).prepare(model, opt, probe=x)
    assert f"{s}.expand_1x1.activation" in {site.name for site in method.sites}
    method.end_epoch()
    assert method.metrics["redo/recycled"] >= 1
    changed = (conv.detach() != before).flatten(1).any(1)
    assert changed[5] and changed.sum() <= method.metrics["redo/recycled"]   # the dead one
    assert float(model.get_submodule(f"{s}.expand_1x1.normalization").bias[5]) == 0.0
