using F = TorchSharp.torch.nn.functional;

namespace LoRAHub.DoRA.Tests;

/// <summary>Autograd gradients of m, A and B against central differences in float64.</summary>
public class GradientTests
{
    private const double Eps = 1e-6;

    private sealed record Setup(TinyModel Model, LoraAdapter Adapter, LoraLinear Layer, Tensor X, Tensor Weights) : IDisposable
    {
        public Tensor Loss(Tensor y) => y.mul(Weights).sum();
        public void Dispose()
        {
            Adapter.Dispose();
            Model.Dispose();
        }
    }

    private static Setup Create(bool detach, DoraNormMethod norm)
    {
        var model = new TinyModel(dtype: ScalarType.Float64, bias: true);
        var adapter = Dora.Attach(model, Dora.Options(init: LoraInit.Random, norm: norm, detach: detach));
        Dora.PerturbMagnitudes(adapter);
        var layer = adapter.Layers[Dora.Q0];
        torchx.manual_seed(5);
        return new Setup(model, adapter, layer, torch.randn([3, TinyModel.DefaultHidden], ScalarType.Float64),
            torch.randn([3, TinyModel.DefaultHidden], ScalarType.Float64));
    }

    /// <summary>Central differences of <paramref name="loss"/> over every entry of <paramref name="p"/> (perturbed in place).</summary>
    private static Tensor NumericGradient(Tensor p, Func<double> loss)
    {
        var n = p.numel();
        var grad = new double[n];
        var flat = p.view(-1);
        using var _ = torch.no_grad();
        for (var i = 0; i < n; i++)
        {
            var entry = flat.narrow(0, i, 1);
            var original = entry.ToDouble();
            entry.fill_(original + Eps);
            var plus = loss();
            entry.fill_(original - Eps);
            var minus = loss();
            entry.fill_(original);
            grad[i] = (plus - minus) / (2 * Eps);
        }
        return torch.tensor(grad, p.shape);
    }

    private static Dictionary<string, Tensor> AutogradGradients(Setup t)
    {
        var parameters = new Dictionary<string, Tensor>
        {
            ["m"] = Dora.Magnitude(t.Layer), ["A"] = t.Layer.A("default"), ["B"] = t.Layer.B("default"),
        };
        foreach (var p in parameters.Values) p.grad?.Dispose();
        t.Loss(t.Layer.forward(t.X)).backward();
        return parameters.ToDictionary(kv => kv.Key, kv => kv.Value.grad!.clone());
    }

    [Theory]
    [InlineData(DoraNormMethod.Factored)]
    [InlineData(DoraNormMethod.Direct)]
    public void Detached_norm_gradients_match_differences_of_the_loss_with_the_norm_held_constant(DoraNormMethod norm)
    {
        using var t = Create(detach: true, norm);
        var grads = AutogradGradients(t);

        // The loss as DoRA defines it with ‖V‖ frozen at its current value n0: y = (m/n0)⊙(W0x + s·B·A·x) + bias.
        var layer = t.Layer;
        var w0 = layer.base_linear.dense_weight();
        var bias = layer.base_linear.bias!;
        var s = layer.Scaling("default");
        Tensor n0;
        using (torch.no_grad()) n0 = w0.add(layer.B("default").matmul(layer.A("default")), alpha: s).norm(dim: 1);
        double FrozenNormLoss()
        {
            using var scope = torch.NewDisposeScope();
            var v = w0.add(layer.B("default").matmul(layer.A("default")), alpha: s);
            var y = F.linear(t.X, v).mul(Dora.Magnitude(layer).div(n0)).add(bias);
            return t.Loss(y).ToDouble();
        }

        Assert.True(grads["m"].allclose(NumericGradient(Dora.Magnitude(layer), FrozenNormLoss), 1e-6, 1e-7), "m");
        Assert.True(grads["A"].allclose(NumericGradient(layer.A("default"), FrozenNormLoss), 1e-6, 1e-7), "A");
        Assert.True(grads["B"].allclose(NumericGradient(layer.B("default"), FrozenNormLoss), 1e-6, 1e-7), "B");
    }

    [Theory]
    [InlineData(DoraNormMethod.Factored)]
    [InlineData(DoraNormMethod.Direct)]
    public void Undetached_norm_gradients_match_differences_of_the_layer_itself(DoraNormMethod norm)
    {
        using var t = Create(detach: false, norm);
        var grads = AutogradGradients(t);
        double LayerLoss()
        {
            using var scope = torch.NewDisposeScope();
            return t.Loss(t.Layer.forward(t.X)).ToDouble();
        }
        Assert.True(grads["m"].allclose(NumericGradient(Dora.Magnitude(t.Layer), LayerLoss), 1e-6, 1e-7), "m");
        Assert.True(grads["A"].allclose(NumericGradient(t.Layer.A("default"), LayerLoss), 1e-6, 1e-7), "A");
        Assert.True(grads["B"].allclose(NumericGradient(t.Layer.B("default"), LayerLoss), 1e-6, 1e-7), "B");
    }

    [Fact]
    public void Detaching_the_norm_changes_the_direction_gradients_but_not_the_magnitude_gradient()
    {
        using var detached = Create(detach: true, DoraNormMethod.Factored);
        using var exact = Create(detach: false, DoraNormMethod.Factored);
        var g1 = AutogradGradients(detached);
        var g2 = AutogradGradients(exact);
        Assert.True(g1["m"].allclose(g2["m"], 1e-12, 1e-12));
        Assert.False(g1["A"].allclose(g2["A"], 1e-4, 1e-4));
        Assert.False(g1["B"].allclose(g2["B"], 1e-4, 1e-4));
    }
}
