
namespace LoRAHub.LoRA.Tests;

/// <summary>Shared helpers: attach LoRA to a TinyModel and snapshot tensors.</summary>
internal static class Lora
{
    public static LoraAdapter Attach(TinyModel model, LoraOptions options) => (LoraAdapter)new LoraMethod().Attach(model, options);

    public static LoraOptions Options(int r = 4, double alpha = 8, LoraInit? init = null, TargetModuleSpec? targets = null) => new()
    {
        R = r,
        LoraAlpha = alpha,
        InitLoraWeights = init ?? LoraInit.Default,
        TargetModules = targets ?? new[] { "q_proj", "v_proj" },
    };

    /// <summary>Detached copies of every parameter by name (for bit-exact comparisons).</summary>
    public static Dictionary<string, Tensor> Snapshot(nn.Module m) =>
        m.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());

    public static string TempDir()
    {
        var dir = Path.Combine(Path.GetTempPath(), "lorahub-lora-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        return dir;
    }
}
