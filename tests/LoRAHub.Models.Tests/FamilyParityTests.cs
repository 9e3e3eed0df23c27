using System.Text.Json;
using LoRAHub.Models.Generation;
using LoRAHub.Models.Llama;
using LoRAHub.Plugins.LoRA;

namespace LoRAHub.Models.Tests;

/// <summary>A theory over the families, skipped with the reason until scripts/fixtures/make_families.py's output is committed.</summary>
public sealed class FamilyFixtureTheoryAttribute : TheoryAttribute
{
    public FamilyFixtureTheoryAttribute()
    {
        if (!Directory.Exists(FamilyParityTests.Root()))
            Skip = $"no family fixtures at {FamilyParityTests.Root()}: on a machine with torch + transformers + peft run " +
                "`python3 scripts/fixtures/make_families.py tests/LoRAHub.Models.Tests/fixtures/families` and commit the folder";
    }
}

/// <summary>
/// Each family against transformers (fp32, tiny random configs with small sliding windows and soft-caps): logits within
/// 1e-4, 20 greedy tokens equal with and without the KV cache, and a PEFT-saved LoRA adapter giving PEFT's logits.
/// </summary>
public sealed class FamilyParityTests(Xunit.Abstractions.ITestOutputHelper output)
{
    public static string Root() => Path.Combine(ParityTests.FixtureRoot(), "families");

    public static readonly TheoryData<string> Families = new() { "mistral_window", "qwen3", "qwen3_window", "gemma2", "gemma3_text", "phi3", "mixtral" };

    private static JsonElement Expected(string folder) => JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "expected.json"))).RootElement;

    private static Tensor Ids(JsonElement root)
    {
        var rows = root.GetProperty("input_ids").EnumerateArray().Select(r => r.EnumerateArray().Select(x => x.GetInt64()).ToArray()).ToArray();
        return torch.tensor(rows.SelectMany(r => r).ToArray(), [rows.Length, rows[0].Length], device: TinyModels.Device);
    }

    private static float MaxDiff(JsonElement expected, Tensor logits)
    {
        var want = expected.EnumerateArray().SelectMany(b => b.EnumerateArray().SelectMany(r => r.EnumerateArray().Select(x => (float)x.GetDouble()))).ToArray();
        var got = logits.cpu().contiguous().data<float>().ToArray();
        Assert.Equal(want.Length, got.Length);
        return want.Zip(got, (a, b) => Math.Abs(a - b)).Max();
    }

    [FamilyFixtureTheory]
    [MemberData(nameof(Families))]
    public void Logits_and_greedy_tokens_match_transformers(string family)
    {
        var folder = Path.Combine(Root(), family);
        Assert.True(File.Exists(Path.Combine(folder, "expected.json")), $"{folder}/expected.json is missing: re-run scripts/fixtures/make_families.py");
        var root = Expected(folder);
        using var scope = torch.NewDisposeScope();
        using var model = PretrainedModel.LoadLlama(folder, ScalarType.Float32, TinyModels.Device);
        var diff = MaxDiff(root.GetProperty("logits"), model.Forward(Ids(root)));
        output.WriteLine($"{family} (transformers {root.GetProperty("transformers")}): max |logit difference| {diff:E2}");
        Assert.True(diff < 1e-4f, $"{family}: logits differ from transformers' by {diff}");

        var greedy = root.GetProperty("greedy");
        var prompt = greedy.GetProperty("prompt").EnumerateArray().Select(x => x.GetInt32()).ToArray();
        int[] Tokens(string key) => greedy.GetProperty(key).EnumerateArray().Select(x => x.GetInt32()).ToArray();
        var options = new GenerationOptions { MaxNewTokens = 20 };
        Assert.Equal(Tokens("cache"), TextGenerator.Generate(model, [prompt], options)[0]);
        Assert.Equal(Tokens("no_cache"), TextGenerator.Generate(model, [prompt], options with { UseCache = false })[0]);
    }

    [FamilyFixtureTheory]
    [MemberData(nameof(Families))]
    public void Peft_lora_adapter_gives_peft_logits(string family)
    {
        var folder = Path.Combine(Root(), family);
        var root = Expected(folder);
        using var scope = torch.NewDisposeScope();
        using var model = PretrainedModel.LoadLlama(folder, ScalarType.Float32, TinyModels.Device);
        using var adapter = new LoraMethod().Load(model, Path.Combine(folder, "peft_lora"));
        var diff = MaxDiff(root.GetProperty("lora_logits"), model.Forward(Ids(root)));
        output.WriteLine($"{family}: LoRA on {string.Join(",", root.GetProperty("lora_targets").EnumerateArray())}, max |logit difference| {diff:E2}");
        Assert.True(diff < 1e-4f, $"{family}: logits with PEFT's adapter differ from PEFT's by {diff}");
    }

    [FamilyFixtureTheory]
    [InlineData("mixtral")]
    public void Mixtral_loss_with_router_aux_loss_matches_transformers(string family)
    {
        var folder = Path.Combine(Root(), family);
        var root = Expected(folder);
        using var scope = torch.NewDisposeScope();
        using var model = PretrainedModel.LoadLlama(folder, ScalarType.Float32, TinyModels.Device);
        model.Config.OutputRouterLogits = true; // eval mode, as the fixture's forward with output_router_logits=True
        var ids = Ids(root);
        var loss = model.ComputeLoss(ids, ids).item<float>();
        Assert.True(Math.Abs(loss - root.GetProperty("loss").GetDouble()) < 1e-4, $"loss {loss} vs transformers {root.GetProperty("loss").GetDouble()}");
        Assert.True(Math.Abs(model.LastRouterAuxLoss!.Value - root.GetProperty("aux_loss").GetDouble()) < 1e-5,
            $"aux loss {model.LastRouterAuxLoss} vs transformers {root.GetProperty("aux_loss").GetDouble()}");
    }
}
