using LoRAHub.Tuners.Lora.Merging;

namespace LoRAHub.LoRA.Tests;

/// <summary>add_weighted_adapter's combination types and PEFT's merge_utils, checked against hand-computed values.</summary>
public class WeightedAdapterTests
{
    private static Tensor T(params float[] v) => tensor(v);

    [Fact]
    public void Ties_trims_elects_the_sign_by_total_and_averages_the_agreeing_entries()
    {
        var merged = MergeUtils.Ties([T(1, -2, 3), T(-1, -1, 1)], [1.0, 1.0], density: 1);
        Assert.True(merged.allclose(T(1, -1.5f, 2)));
        // density 0.5 keeps the one largest |entry| of each 3-vector (⌊1.5⌋ = 1).
        var pruned = MergeUtils.Ties([T(1, -2, 3), T(-1, -4, 1)], [1.0, 0.5], density: 0.5);
        Assert.True(pruned.allclose(T(0, -2, 3)));
    }

    [Fact]
    public void Frequency_elects_the_sign_most_tensors_have()
    {
        var stacked = stack([T(1, -2, 3), T(-1, -1, 1), T(-1, 5, 1)], 0);
        var mask = MergeUtils.CalculateMajoritySignMask(stacked, "frequency");
        Assert.Equal([false, true, true, true, true, true, true, false, true], mask.reshape(-1).data<bool>().ToArray());
        var total = MergeUtils.CalculateMajoritySignMask(stacked, "total"); // sums -1, 2, 5: elects -, +, +
        Assert.Equal([false, false, true, true, false, true, true, true, true], total.reshape(-1).data<bool>().ToArray());
    }

    [Fact]
    public void Magnitude_prune_keeps_the_largest_entries_and_dare_rescales_the_kept_ones()
    {
        Assert.True(MergeUtils.MagnitudePrune([T(1, -4, 2, -3)], [2.0], density: 0.5).allclose(T(0, -8, 0, -6)));
        torchx.manual_seed(0);
        var values = T(1, -4, 2, -3, 5, 6, -7, 8);
        var dare = MergeUtils.DareLinear([values], [1.0], density: 0.5);
        foreach (var (kept, original) in dare.data<float>().ToArray().Zip(values.data<float>().ToArray()))
            Assert.True(kept == 0 || Math.Abs(kept - 2 * original) < 1e-6);
        var other = T(-1, 4, 2, 3, -5, 6, 7, -8);
        Assert.True(MergeUtils.DareTies([values, other], [1.0, 0.5], density: 1).allclose(MergeUtils.Ties([values, other], [1.0, 0.5], density: 1)));
        Assert.Throws<ArgumentException>(() => MergeUtils.Prune(values, -0.1, "magnitude"));
    }

    private static (TinyModel model, LoraAdapter adapter) TwoAdapters(int r2 = 4)
    {
        var model = new TinyModel();
        var adapter = Lora.Attach(model, Lora.Options(r: 4, alpha: 8, init: LoraInit.Random));
        adapter.AddAdapter("b", Lora.Options(r: r2, alpha: 4, init: LoraInit.Random));
        return (model, adapter);
    }

    [Fact]
    public void Linear_combines_A_and_B_with_square_root_weights()
    {
        var (model, adapter) = TwoAdapters();
        using var _ = model;
        using var __ = adapter;
        adapter.AddWeightedAdapter("mix", ["default", "b"], [0.7, -0.3], combinationType: "linear");
        var layer = adapter.Layers["model.layers.0.self_attn.q_proj"];
        double s1 = 0.7 * layer.Scaling("default"), s2 = -0.3 * layer.Scaling("b");
        var a = layer.A("default").mul(Math.Sqrt(Math.Abs(s1))).add(layer.A("b").mul(-Math.Sqrt(Math.Abs(s2))));
        var b = layer.B("default").mul(Math.Sqrt(Math.Abs(s1))).add(layer.B("b").mul(Math.Sqrt(Math.Abs(s2))));
        Assert.True(layer.DeltaWeight("mix").allclose(b.matmul(a), 1e-5, 1e-6));
        Assert.Equal(1.0, layer.Scaling("mix"));
        // One adapter alone is exactly w·ΔW.
        adapter.AddWeightedAdapter("half", ["b"], [0.5], combinationType: "ties", density: 0.2);
        Assert.True(layer.DeltaWeight("half").allclose(layer.DeltaWeight("b").mul(0.5), 1e-5, 1e-6));
    }

    [Fact]
    public void Svd_at_full_rank_reproduces_the_weighted_deltas_as_PEFT_computes_them()
    {
        var (model, adapter) = TwoAdapters(r2: 2);
        using var _ = model;
        using var __ = adapter;
        adapter.AddWeightedAdapter("svd", ["default", "b"], [0.7, -0.3], combinationType: "svd", svdRank: 6);
        var layer = adapter.Layers["model.layers.1.self_attn.v_proj"];
        // PEFT weights the scaled deltas by w·s (the scaling applies twice).
        var expected = layer.DeltaWeight("default").mul(0.7 * layer.Scaling("default")).add(layer.DeltaWeight("b").mul(-0.3 * layer.Scaling("b")));
        Assert.True(layer.DeltaWeight("svd").allclose(expected, 1e-4, 1e-5));
        Assert.Equal(6, layer.Rank("svd"));
        // A lower rank keeps the top singular directions; a clamp bounds the entries.
        adapter.AddWeightedAdapter("low", ["default", "b"], [0.7, -0.3], combinationType: "ties_svd", svdRank: 2, density: 1, svdClamp: 0.9);
        Assert.Equal(2, layer.Rank("low"));
        Assert.Throws<InvalidOperationException>(() => adapter.AddWeightedAdapter("bad", ["default", "b"], [1, 1], combinationType: "linear"));
        Assert.Throws<ArgumentException>(() => adapter.AddWeightedAdapter("bad", ["default", "b"], [1, 1], combinationType: "dare_ties"));
        Assert.Throws<ArgumentException>(() => adapter.AddWeightedAdapter("bad", ["default", "b"], [1, 1], combinationType: "average"));
        Assert.DoesNotContain("bad", adapter.AdapterNames);
    }

    [Theory]
    [InlineData("ties")]
    [InlineData("dare_linear")]
    [InlineData("dare_ties")]
    [InlineData("magnitude_prune")]
    [InlineData("dare_linear_svd")]
    [InlineData("dare_ties_svd")]
    [InlineData("magnitude_prune_svd")]
    public void Every_pruning_type_builds_an_adapter_that_saves_and_reloads(string type)
    {
        var (model, adapter) = TwoAdapters();
        using var _ = model;
        using var __ = adapter;
        adapter.AddWeightedAdapter("mix", ["default", "b"], [1.0, 1.0], combinationType: type, density: 0.5, majoritySignMethod: "frequency");
        adapter.SetActiveAdapter("mix");
        var x = TinyModel.Batch();
        var logits = model.Forward(x);
        var dir = Lora.TempDir();
        adapter.Save(dir);
        using var fresh = new TinyModel();
        using var loaded = new LoraMethod().Load(fresh, dir);
        Assert.True(fresh.Forward(x).allclose(logits, 1e-5, 1e-6));
    }
}
