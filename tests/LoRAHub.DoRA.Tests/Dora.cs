
namespace LoRAHub.DoRA.Tests;

/// <summary>Shared helpers: attach DoRA to a TinyModel, compute DoRA by its definition, snapshot tensors.</summary>
internal static class Dora
{
    public const string Q0 = "model.layers.0.self_attn.q_proj";

    public static LoraAdapter Attach(TinyModel model, DoraOptions options) => (LoraAdapter)new DoraMethod().Attach(model, options);

    public static DoraOptions Options(int r = 4, double alpha = 8, LoraInit? init = null, TargetModuleSpec? targets = null,
        DoraNormMethod norm = DoraNormMethod.Factored, bool detach = true) => new()
    {
        R = r,
        LoraAlpha = alpha,
        InitLoraWeights = init ?? LoraInit.Default,
        TargetModules = targets ?? new[] { "q_proj", "v_proj" },
        NormMethod = norm,
        DetachNorm = detach,
    };

    public static Tensor Magnitude(LoraLinear layer, string adapter = "default") => DoraVariant.Layer(layer, adapter).weight;

    /// <summary>Scales m by random factors in [0.5, 1.5), so m/‖V‖ is not 1 and the magnitude matters.</summary>
    public static void PerturbMagnitudes(LoraAdapter adapter, long seed = 7, string name = "default")
    {
        torchx.manual_seed(seed);
        using var _ = torch.no_grad();
        foreach (var layer in adapter.Layers.Values.Where(l => l.HasAdapter(name)))
        {
            var m = Magnitude(layer, name);
            m.mul_(torch.rand(m.shape, m.dtype).add(0.5));
        }
    }

    /// <summary>W' = m ⊙ V/‖V‖ (V = W0 + s·B·A) in float64: the definition, for comparisons.</summary>
    public static Tensor MergedWeight(LoraLinear layer, string adapter = "default")
    {
        var w0 = layer.base_linear.dense_weight().to(ScalarType.Float64);
        var v = w0.add(layer.B(adapter).to(ScalarType.Float64).matmul(layer.A(adapter).to(ScalarType.Float64)), alpha: layer.Scaling(adapter));
        return v.mul(Magnitude(layer, adapter).to(ScalarType.Float64).div(v.norm(dim: 1)).unsqueeze(1));
    }

    /// <summary>Detached copies of every parameter by name.</summary>
    public static Dictionary<string, Tensor> Snapshot(nn.Module m) =>
        m.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());

    public static string TempDir()
    {
        var dir = Path.Combine(Path.GetTempPath(), "lorahub-dora-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        return dir;
    }
}
