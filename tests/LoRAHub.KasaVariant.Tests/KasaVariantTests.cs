using System.Text.Json;

namespace LoRAHub.KasaVariant.Tests;

/// <summary>
/// KaSA's math against direct composite computations: the SVD truncation of the base at init, the forward
/// y = x·W_tᵀ + s·((x·Aᵀ) ⊙ ΔΣ)·Bᵀ, merge/unmerge, merge_and_unload, the regularizer, and PEFT's file format.
/// </summary>
public sealed class KasaVariantTests : IDisposable
{
    private const string Q = "model.layers.0.self_attn.q_proj";
    private readonly string temp = Directory.CreateTempSubdirectory("kasa-tests-").FullName;

    public void Dispose() => Directory.Delete(temp, recursive: true);

    private static KasaOptions Options(int r = 2) =>
        new() { R = r, LoraAlpha = 4, TargetModules = new[] { "q_proj", "v_proj" }, InitLoraWeights = LoraInit.Random };

    private static KasaOptions WithConfig(KasaOptions options, double beta, double gamma)
    {
        options.KasaConfig = new KasaConfig { Beta = beta, Gamma = gamma };
        return options;
    }

    private static Tensor Weight(TinyModel model, string path) => ((Linear)(model.Root.get_submodule(path) is LoraLinear l ? l.base_layer : model.Root.get_submodule(path)!)).weight!;

    /// <summary>W with its r smallest singular values zeroed: U·diag(S')·Vh (a different formula from the variant's slicing).</summary>
    private static Tensor Truncated(Tensor w, int r)
    {
        var (u, s, vh) = linalg.svd(w.to(ScalarType.Float32), fullMatrices: false);
        var kept = s.clone();
        kept[TensorIndex.Slice(s.shape[0] - r)] = 0;
        return u.matmul(diag(kept)).matmul(vh);
    }

    private static LoraLinear Layer(IAdapter adapter, string path) => ((LoraAdapter)adapter).Layers[path];

    // B starts at zero: give every adapter tensor values that show in the output.
    private static void Randomize(IAdapter adapter, long seed = 3)
    {
        torchx.manual_seed(seed);
        using var _ = no_grad();
        foreach (var layer in ((LoraAdapter)adapter).Layers.Values)
        {
            layer.B("default").normal_(0, 0.3);
            KasaLinearVariant.Diagonal(layer, "default").normal_(0, 1);
        }
    }

    [Fact]
    public void Init_truncates_the_base_to_its_top_singular_components()
    {
        using var model = new TinyModel(seed: 1);
        var original = Weight(model, Q).detach().clone();
        var expected = Truncated(original, 2);
        using var adapter = new KasaMethod().Attach(model, Options());

        var truncated = Weight(model, Q);
        Assert.True(truncated.allclose(expected, rtol: 1e-5, atol: 1e-5));
        Assert.False(truncated.allclose(original, rtol: 1e-3, atol: 1e-3));
        var singular = linalg.svdvals(truncated);
        Assert.True(singular[TensorIndex.Slice(6)].abs().max().item<float>() < 1e-4, "the 2 smallest singular values are gone");
        Assert.Equal([2L], KasaLinearVariant.Diagonal(Layer(adapter, Q), "default").shape);
        // The unadapted o_proj keeps its weight.
        Assert.Equal(new TinyModel(seed: 1).Root.get_submodule("model.layers.0.self_attn.o_proj")!.parameters().First().data<float>().ToArray(),
            model.Root.get_submodule("model.layers.0.self_attn.o_proj")!.parameters().First().data<float>().ToArray());
    }

    [Fact]
    public void Forward_equals_the_composite_computation()
    {
        using var model = new TinyModel(seed: 2, bias: true);
        using var adapter = new KasaMethod().Attach(model, Options());
        Randomize(adapter);
        var layer = Layer(adapter, Q);
        torchx.manual_seed(9);
        var x = randn([3, 5, TinyModel.DefaultHidden]);

        var a = layer.A("default");
        var b = layer.B("default");
        var d = KasaLinearVariant.Diagonal(layer, "default");
        var baseLinear = (Linear)layer.base_layer;
        var s = 4.0 / 2;
        var expected = x.matmul(baseLinear.weight!.t()) + baseLinear.bias! + s * x.matmul(a.t()).mul(d).matmul(b.t());
        using var __ = no_grad();
        var actual = layer.call(x);
        Assert.True(actual.allclose(expected, rtol: 1e-5, atol: 1e-5), $"max diff {(actual - expected).abs().max().item<float>()}");
        // ΔW as one matrix: s·B·diag(ΔΣ)·A.
        Assert.True(KasaLinearVariant.DeltaWeight(layer, "default").allclose(s * b.matmul(diag(d)).matmul(a), rtol: 1e-5, atol: 1e-6));
        // Disabled: the truncated base, as in PEFT (the truncation is not undone).
        using (adapter.DisableAdapter())
            Assert.True(layer.call(x).allclose(baseLinear.call(x)));
    }

    [Fact]
    public void Merge_adds_the_delta_and_unmerge_returns_to_the_truncated_base()
    {
        using var model = new TinyModel(seed: 3);
        using var adapter = new KasaMethod().Attach(model, Options());
        Randomize(adapter);
        var ids = TinyModel.Batch();
        using var _ = no_grad();
        var before = model.Forward(ids);
        var layer = Layer(adapter, Q);
        var truncated = Weight(model, Q).clone();
        var expected = truncated + 2.0 * layer.B("default").matmul(diag(KasaLinearVariant.Diagonal(layer, "default"))).matmul(layer.A("default"));

        adapter.Merge();
        Assert.True(Weight(model, Q).allclose(expected, rtol: 1e-5, atol: 1e-6));
        Assert.True(model.Forward(ids).allclose(before, rtol: 1e-4, atol: 1e-5));
        adapter.Unmerge();
        Assert.True(Weight(model, Q).allclose(truncated, rtol: 1e-5, atol: 1e-6));
        Assert.True(model.Forward(ids).allclose(before, rtol: 1e-4, atol: 1e-5));
    }

    [Fact]
    public void MergeAndUnload_leaves_a_plain_model_with_the_same_logits()
    {
        using var model = new TinyModel(seed: 4);
        var adapter = new KasaMethod().Attach(model, Options());
        Randomize(adapter);
        var ids = TinyModel.Batch();
        using var _ = no_grad();
        var before = model.Forward(ids);
        adapter.MergeAndUnload();
        Assert.DoesNotContain(model.named_modules(), m => m.module is LoraLinear);
        Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains("lora_"));
        Assert.True(model.Forward(ids).allclose(before, rtol: 1e-4, atol: 1e-5));
    }

    [Fact]
    public void Saves_PEFTs_format_and_loads_it_back_with_the_same_logits()
    {
        var folder = Path.Combine(temp, "kasa");
        var ids = TinyModel.Batch();
        Tensor expected;
        using (var model = new TinyModel(seed: 5))
        using (var adapter = new KasaMethod().Attach(model, WithConfig(Options(), beta: 0.5, gamma: 0.25)))
        {
            Randomize(adapter);
            adapter.Save(folder);
            using var _ = no_grad();
            expected = model.Forward(ids).DetachFromDisposeScope();
        }

        using (var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "adapter_config.json"))))
        {
            var root = doc.RootElement;
            Assert.Equal("LORA", root.GetProperty("peft_type").GetString());
            Assert.Equal(0.5, root.GetProperty("kasa_config").GetProperty("beta").GetDouble());
            Assert.Equal(0.25, root.GetProperty("kasa_config").GetProperty("gamma").GetDouble());
            Assert.False(root.GetProperty("use_dora").GetBoolean());
            Assert.Equal(2, root.GetProperty("r").GetInt32());
        }
        var saved = torchx.load_safetensors(Path.Combine(folder, "adapter_model.safetensors"), CPU);
        Assert.Equal([2L], saved[$"base_model.model.{Q}.lora_diag"].shape);
        Assert.Equal(
            new[] { "lora_A.weight", "lora_B.weight", "lora_diag" }.SelectMany(k => new[] { Q, "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj" }
                .Select(p => $"base_model.model.{p}.{k}")).Order(StringComparer.Ordinal),
            saved.Keys.Order(StringComparer.Ordinal));

        var method = new KasaMethod();
        Assert.True(method.Claims(folder));
        using var fresh = new TinyModel(seed: 5);
        using var loaded = method.Load(fresh, folder);
        Assert.Equal(0.5, ((KasaOptions)loaded.Options).KasaConfig.Beta);
        using var __ = no_grad();
        var actual = fresh.Forward(ids);
        Assert.True(actual.allclose(expected, rtol: 1e-5, atol: 1e-5), $"max diff {(actual - expected).abs().max().item<float>()}");
    }

    [Fact]
    public void A_plain_LoRA_folder_is_not_claimed_and_not_loaded()
    {
        var folder = Path.Combine(temp, "plain");
        using (var model = new TinyModel(seed: 6))
        using (var adapter = LoraAdapter.Build(new KasaMethod(), model, a => a.AddAdapter("default", new LoraOptions { R = 2, TargetModules = new[] { "q_proj" } })))
            adapter.Save(folder);
        var method = new KasaMethod();
        Assert.False(method.Claims(folder));
        using var fresh = new TinyModel(seed: 6);
        var error = Assert.Throws<AdapterConfigurationException>(() => method.Load(fresh, folder));
        Assert.Contains("kasa_config", error.Message);
    }

    [Fact]
    public void A_rank_that_leaves_no_component_is_refused_before_any_weight_changes()
    {
        using var model = new TinyModel(seed: 7);
        var before = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        var error = Assert.Throws<AdapterConfigurationException>(() => new KasaMethod().Attach(model, Options(r: TinyModel.DefaultHidden)));
        Assert.Contains("'r'", error.Message);
        Assert.DoesNotContain(model.named_modules(), m => m.module is LoraLinear);
        foreach (var (key, value) in model.state_dict()) Assert.True(value.allclose(before[key]), key);
    }

    [Fact]
    public void Regularizer_equals_the_direct_sum_and_trains_the_diagonal()
    {
        using var model = new TinyModel(seed: 8);
        var options = Options();
        options.KasaConfig = new KasaConfig { Beta = 0.1, Gamma = 0.01 };
        using var adapter = (LoraAdapter)new KasaMethod().Attach(model, options);
        Randomize(adapter);
        Tensor expected = zeros([]);
        foreach (var layer in adapter.Layers.Values)
        {
            var (a, b, d) = (layer.A("default"), layer.B("default"), KasaLinearVariant.Diagonal(layer, "default"));
            var eye = torch.eye(2);
            var l3 = (b.t().matmul(b) - eye).pow(2).sum().sqrt() + (a.matmul(a.t()) - eye).pow(2).sum().sqrt();
            expected = expected + 0.1 * d.pow(2).sum() + 0.01 * l3;
        }
        var loss = KasaLoss.Compute(adapter);
        Assert.True(loss.allclose(expected, rtol: 1e-5, atol: 1e-6), $"{loss.item<float>()} vs {expected.item<float>()}");

        // ΔΣ is trained: it is in the parameter groups and gets a gradient through the task loss plus the regularizer.
        var diagonal = KasaLinearVariant.Diagonal(adapter.Layers[Q], "default");
        Assert.Contains(adapter.ParameterGroups(1e-3, 0).SelectMany(g => g.Parameters), p => ReferenceEquals(p, diagonal));
        var total = model.Loss(TinyModel.Batch(), TinyModel.Batch(seed: 2)) + KasaLoss.Compute(adapter);
        total.backward();
        Assert.NotNull(diagonal.grad);
        Assert.True(diagonal.grad!.abs().sum().item<float>() > 0);
        Assert.True(Weight(model, Q).grad is null, "the base stays frozen");
    }
}
