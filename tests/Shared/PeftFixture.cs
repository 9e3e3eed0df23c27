using System.Text.Json;
using LoRAHub.Models;
using LoRAHub.Models.Llama;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Tests.Shared;

/// <summary>
/// An adapter folder saved by Python PEFT (scripts/peft/check.sh, on the GPU machine where PEFT is installed) on the
/// Models suite's tiny Llama fixture, with the logits PEFT computed (logits.json). Lets CI check the format without Python.
/// </summary>
public sealed class PeftFixture
{
    public PeftFixture(string suite)
    {
        var root = RepoRoot();
        AdapterDir = Path.Combine(root, "tests", suite, "fixtures", "peft_adapter");
        BaseModelDir = Path.Combine(root, "tests", "LoRAHub.Models.Tests", "fixtures", "llama");
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(AdapterDir, "logits.json")));
        InputIds = doc.RootElement.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt64()).ToArray();
        ExpectedLogits = doc.RootElement.GetProperty("logits").EnumerateArray().Select(e => e.GetSingle()).ToArray();
    }

    public string AdapterDir { get; }
    public string BaseModelDir { get; }
    public long[] InputIds { get; }
    public float[] ExpectedLogits { get; }

    public LlamaForCausalLM LoadBaseModel() => PretrainedModel.LoadLlama(BaseModelDir);

    public float[] Logits(LlamaForCausalLM model)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        return model.Forward(torch.tensor(InputIds, [1, InputIds.Length])).reshape(-1).to(ScalarType.Float32).data<float>().ToArray();
    }

    /// <summary>Largest |difference| from PEFT's logits.</summary>
    public float MaxDiff(float[] logits) => ExpectedLogits.Zip(logits).Max(p => Math.Abs(p.First - p.Second));

    private static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "LoRAHub.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new DirectoryNotFoundException("LoRAHub.sln not found above " + AppContext.BaseDirectory);
    }
}
