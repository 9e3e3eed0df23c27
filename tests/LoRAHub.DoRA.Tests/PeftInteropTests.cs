using System.Text.Json;
using LoRAHub.Models;

namespace LoRAHub.DoRA.Tests;

/// <summary>
/// A DoRA adapter (use_dora, perturbed magnitudes) saved by Python PEFT 0.21 (scripts/peft/check.sh on the GPU machine)
/// on the Models suite's tiny Llama fixture: it loads here with PEFT's logits. The other direction (PEFT loading ours)
/// is checked by the same script.
/// </summary>
public sealed class PeftInteropTests
{
    private static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "LoRAHub.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new DirectoryNotFoundException("LoRAHub.sln not found above " + AppContext.BaseDirectory);
    }

    [Fact]
    public void Dora_adapter_saved_by_python_peft_gives_peft_logits()
    {
        var root = RepoRoot();
        var adapterDir = Path.Combine(root, "tests", "LoRAHub.DoRA.Tests", "fixtures", "peft_adapter");
        using var model = PretrainedModel.LoadLlama(Path.Combine(root, "tests", "LoRAHub.Models.Tests", "fixtures", "llama"));
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(adapterDir, "logits.json")));
        var ids = doc.RootElement.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt64()).ToArray();
        var expected = doc.RootElement.GetProperty("logits").EnumerateArray().Select(e => e.GetSingle()).ToArray();

        float[] Logits()
        {
            using var scope = torch.NewDisposeScope();
            using var _ = torch.no_grad();
            return model.Forward(torch.tensor(ids, [1, ids.Length])).reshape(-1).data<float>();
        }

        var baseline = Logits();
        using var adapter = (LoraAdapter)new DoraMethod().Load(model, adapterDir);
        var ours = Logits();

        Assert.Equal(expected.Length, ours.Length);
        Assert.True(expected.Zip(ours).Max(p => Math.Abs(p.First - p.Second)) < 1e-4, "logits differ from PEFT's");
        Assert.True(expected.Zip(baseline).Max(p => Math.Abs(p.First - p.Second)) > 1e-2, "the fixture adapter should change the logits");
        Assert.Equal(["k_proj", "o_proj", "up_proj"], adapter.Layers.Keys.Select(k => k.Split('.').Last()).Distinct().Order());
        Assert.Contains(adapter.StateDict().Keys, k => k.EndsWith(".lora_magnitude_vector", StringComparison.Ordinal));
    }
}
