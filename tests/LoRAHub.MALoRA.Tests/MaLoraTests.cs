using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.MALoRA.Tests;

using F = torch.nn.functional;

public sealed class MaLoraTests
{
    private static readonly string[] Targets = ["q_proj", "v_proj", "o_proj"];

    private static MaLoraAdapter Attach(TinyModel model, int experts = 4, int topK = 2, double aux = 0.01) =>
        (MaLoraAdapter)new MaLoraMethod().Attach(model, new MaLoraOptions
        {
            NumExperts = experts, TopK = topK, SharedRank = 4, ExpertRank = 3, LoraAlpha = 6, RouterAuxLossCoef = aux, TargetModules = Targets.ToList(),
        });

    [Fact]
    public void Starts_as_the_base_model_and_disabling_restores_it()
    {
        using var scope = torch.NewDisposeScope();
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        using var adapter = Attach(model);
        Assert.True(model.Forward(x).Equals(baseline), "B = 0 at init: the base output exactly");
        using (torch.no_grad())
            foreach (var (_, l) in adapter.Layers) l.B.normal_(0, 0.5);
        Assert.False(model.Forward(x).allclose(baseline, 1e-3, 1e-3));
        adapter.Enabled = false;
        Assert.True(model.Forward(x).Equals(baseline));
    }

    [Fact]
    public void Routed_experts_cannot_be_merged_and_unload_gives_the_base_back()
    {
        using var scope = torch.NewDisposeScope();
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        var adapter = Attach(model);
        using (torch.no_grad())
            foreach (var (_, l) in adapter.Layers) l.B.normal_(0, 0.5);
        Assert.False(adapter.CanMerge);
        Assert.Throws<NotSupportedException>(() => adapter.Merge());
        Assert.Throws<NotSupportedException>(() => adapter.MergeAndUnload());
        Assert.Same(model, adapter.Unload());
        Assert.DoesNotContain(model.named_modules(), m => m.module is MaLoraLinear);
        Assert.True(model.Forward(x).Equals(baseline));
    }

    [Fact]
    public void Each_token_uses_its_top_k_experts_with_gates_summing_to_one()
    {
        using var scope = torch.NewDisposeScope();
        using var model = new TinyModel();
        using var adapter = Attach(model, experts: 5, topK: 2);
        using (torch.no_grad())
            foreach (var (_, l) in adapter.Layers) l.Router.normal_(0, 1);
        var layer = adapter.Layers.Values.First();
        var input = torch.randn([3, 7, TinyModel.DefaultHidden]);
        var gates = layer.Gates(input, out var probs, out _);
        Assert.True(gates.sum([-1]).allclose(torch.ones([3, 7]), 1e-5, 1e-6));
        Assert.True(gates.gt(0).sum([-1]).eq(2).all().item<bool>(), "exactly two experts per token");
        // The chosen ones are the two most probable.
        var top = probs.topk(2, -1).indexes;
        Assert.True(gates.gather(-1, top).gt(0).all().item<bool>());
    }

    [Fact]
    public void Mixture_equals_the_sum_over_experts_of_their_own_low_rank_updates()
    {
        using var scope = torch.NewDisposeScope();
        using var model = new TinyModel();
        using var adapter = Attach(model, experts: 3, topK: 2);
        var (_, layer) = adapter.Layers.First();
        using (torch.no_grad())
        {
            layer.B.normal_(0, 0.5);
            layer.Router.normal_(0, 1);
        }
        var x = torch.randn([4, TinyModel.DefaultHidden]);
        var gates = layer.Gates(x, out _, out _);
        var expected = layer.base_layer.forward(x);
        var h = F.linear(x, layer.S);                      // shared down-projection
        for (var t = 0; t < 3; t++)
        {
            var p = layer.P.narrow(0, t * 3, 3);           // expert t's P (r × shared_rank)
            var b = layer.B.narrow(1, t * 3, 3);           // expert t's B (out × r)
            expected = expected + F.linear(F.linear(h, p), b).mul(gates.narrow(-1, t, 1)).mul(6.0 / 3);
        }
        Assert.True(layer.forward(x).allclose(expected, 1e-5, 1e-6));
    }

    [Fact]
    public void Balance_loss_is_its_coefficient_for_a_uniform_router()
    {
        using var scope = torch.NewDisposeScope();
        using var model = new TinyModel();
        using var adapter = Attach(model, aux: 0.05);
        using (torch.no_grad())
            foreach (var (_, l) in adapter.Layers) l.Router.zero_();
        model.train();
        model.Forward(TinyModel.Batch());
        // Uniform probabilities 1/E: E · Σ_t share_t / E = Σ_t share_t = 1, times the coefficient.
        Assert.Equal(0.05, adapter.AuxiliaryLoss()!.item<float>(), 5);
        model.eval();
        model.Forward(TinyModel.Batch());
        Assert.Null(adapter.AuxiliaryLoss());
    }

    [Fact]
    public void Trains_and_round_trips_through_its_files()
    {
        using var scope = torch.NewDisposeScope();
        var dir = Path.Combine(Path.GetTempPath(), "lorahub-malora-" + Guid.NewGuid().ToString("N"));
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var y = TinyModel.Batch(seed: 2);
        var q = model.get_submodule("model.layers.0.self_attn.q_proj")!.named_parameters().First().parameter.clone();
        using var adapter = Attach(model);
        model.train();
        using var optimizer = new AdamW(adapter.ParameterGroups(2e-2, 0.0));
        var losses = new List<float>();
        for (var step = 0; step < 40; step++)
        {
            using var stepScope = torch.NewDisposeScope();
            var loss = model.Loss(x, y);
            loss = loss + adapter.AuxiliaryLoss()!;
            loss.backward();
            optimizer.step();
            optimizer.zero_grad();
            losses.Add(loss.item<float>());
        }
        Assert.True(losses[^1] < losses[0] * 0.8, $"loss {losses[0]} → {losses[^1]}");
        Assert.True(model.get_submodule("model.layers.0.self_attn.q_proj.base_layer")!.named_parameters().First().parameter.Equals(q));
        model.eval();
        var trained = model.Forward(x);
        try
        {
            adapter.Save(dir);
            Assert.Contains("\"num_experts\": 4", File.ReadAllText(Path.Combine(dir, "malora_config.json")));
            using var fresh = new TinyModel();
            using var loaded = new MaLoraMethod().Load(fresh, dir);
            fresh.eval();
            Assert.True(fresh.Forward(x).allclose(trained, 1e-5, 1e-6));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void Bad_options_are_reported()
    {
        using var model = new TinyModel();
        var e = Assert.Throws<AdapterConfigurationException>(() => new MaLoraMethod().Attach(model, new { num_experts = 2, top_k = 3, target_modules = Targets }));
        Assert.Contains("top_k", e.Message);
        e = Assert.Throws<AdapterConfigurationException>(() => new MaLoraMethod().Attach(model, new { target_modules = new[] { "nope" } }));
        Assert.Contains("q_proj", e.Message);
        var missing = Assert.Throws<FileNotFoundException>(() => new MaLoraMethod().Load(model, Path.GetTempPath()));
        Assert.Contains("malora_config.json", missing.Message);
    }
}
