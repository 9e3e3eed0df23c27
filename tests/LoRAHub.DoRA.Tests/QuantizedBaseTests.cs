using F = TorchSharp.torch.nn.functional;

namespace LoRAHub.DoRA.Tests;

/// <summary>DoRA on a base that is not a dense Linear: W exists only through dense_weight(), as for a 4-bit layer.</summary>
public class QuantizedBaseTests
{
    /// <summary>Stores W rounded to bf16 outside any parameter; dense_weight() builds a new fp32 tensor on each call.</summary>
    private sealed class StoredLinear : nn.Module<Tensor, Tensor>, ILinearLayer
    {
        private Tensor stored;

        public StoredLinear(Linear source) : base("StoredLinear")
        {
            stored = source.weight.detach().bfloat16().DetachFromDisposeScope();
            in_features = source.in_features;
            out_features = source.out_features;
        }

        public long in_features { get; }
        public long out_features { get; }
        public Tensor? bias => null;
        public Device weight_device => stored.device;
        public ScalarType weight_dtype => ScalarType.Float32;
        public int DenseCalls { get; private set; }

        public Tensor dense_weight()
        {
            DenseCalls++;
            return stored.to(ScalarType.Float32);
        }

        public void add_to_weight_(Tensor delta)
        {
            using var _ = torch.no_grad();
            var updated = stored.to(ScalarType.Float32).add(delta.to(ScalarType.Float32)).bfloat16().DetachFromDisposeScope();
            stored.Dispose();
            stored = updated;
        }

        public override Tensor forward(Tensor input) => F.linear(input, dense_weight());
    }

    private static TinyModel ModelWithStoredLinears()
    {
        var model = new TinyModel();
        foreach (var path in new[] { Dora.Q0, "model.layers.1.self_attn.q_proj" })
            model.replace_submodule(path, new StoredLinear((Linear)model.get_submodule(path)!));
        return model;
    }

    [Fact]
    public void Dora_on_a_stored_weight_layer_starts_at_the_base_merges_and_trains()
    {
        using var model = ModelWithStoredLinears();
        var x = TinyModel.Batch();
        var before = model.Forward(x);
        using var adapter = Dora.Attach(model, Dora.Options(targets: new[] { "q_proj" }));
        Assert.True(model.Forward(x).Equals(before));

        using (var optimizer = new LoRAHub.TorchExtensions.Optim.AdamW(adapter.ParameterGroups(0.05, 0)))
            for (var i = 0; i < 5; i++)
            {
                using var scope = torch.NewDisposeScope();
                optimizer.zero_grad();
                model.Loss(x, TinyModel.Batch(seed: 2)).backward();
                optimizer.step();
            }
        var layer = adapter.Layers[Dora.Q0];
        Assert.IsType<StoredLinear>(layer.base_layer);
        var trained = model.Forward(x);
        Assert.False(trained.allclose(before, 1e-4, 1e-4));
        var definition = F.linear(torch.randn([3, TinyModel.DefaultHidden]), Dora.MergedWeight(layer).to(ScalarType.Float32));
        Assert.Equal(3, definition.size(0));

        var version = layer.BaseWeightVersion;
        adapter.Merge();
        Assert.Equal(version + 1, layer.BaseWeightVersion);
        Assert.True(model.Forward(x).allclose(trained, 2e-2, 2e-2)); // W rounded to bf16 once
        adapter.Unmerge();
        Assert.True(model.Forward(x).allclose(trained, 2e-2, 2e-2));
    }
}
