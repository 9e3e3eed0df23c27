using System.Text.Json;
using LoRAHub.Models.Generation;

namespace LoRAHub.Models.Tests;

/// <summary>A fact that is skipped, with the reason, when fixtures/make_fixtures.py has not been run.</summary>
public sealed class FixtureFactAttribute : FactAttribute
{
    public FixtureFactAttribute()
    {
        if (ParityTests.FixtureFolders().Length == 0)
            Skip = "no transformers fixtures: run `python tests/LoRAHub.Models.Tests/fixtures/make_fixtures.py` (needs torch + transformers) to create them";
    }
}

/// <summary>Our logits and greedy tokens against transformers' on the tiny models the fixture script saves.</summary>
public sealed class ParityTests(Xunit.Abstractions.ITestOutputHelper output)
{
    public static string FixtureRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "LoRAHub.Models.Tests.csproj"))) dir = dir.Parent;
        return dir is null ? "" : Path.Combine(dir.FullName, "fixtures");
    }

    public static string[] FixtureFolders() =>
        Directory.Exists(FixtureRoot())
            ? Directory.GetDirectories(FixtureRoot()).Where(d => File.Exists(Path.Combine(d, "expected.json"))).OrderBy(d => d).ToArray()
            : [];

    [FixtureFact]
    public void Logits_and_greedy_tokens_match_transformers()
    {
        var failures = new List<string>();
        foreach (var folder in FixtureFolders())
        {
            using var scope = torch.NewDisposeScope();
            using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "expected.json")));
            var root = doc.RootElement;
            var ids = root.GetProperty("input_ids").EnumerateArray().Select(r => r.EnumerateArray().Select(x => x.GetInt64()).ToArray()).ToArray();
            var expected = root.GetProperty("logits").EnumerateArray()
                .SelectMany(r => r.EnumerateArray().SelectMany(row => row.EnumerateArray().Select(x => (float)x.GetDouble()))).ToArray();
            var rows = root.GetProperty("logits")[0].GetArrayLength();

            using var model = PretrainedModel.Load(folder, ScalarType.Float32, TinyModels.Device);
            var input = torch.tensor(ids.SelectMany(r => r).ToArray(), [ids.Length, ids[0].Length], device: TinyModels.Device);
            var logits = model.Forward(input).narrow(1, 0, rows).cpu().contiguous().data<float>().ToArray();
            var maxDiff = expected.Zip(logits, (a, b) => Math.Abs(a - b)).Max();
            output.WriteLine($"{Path.GetFileName(folder)}: max |logit difference| {maxDiff:E2} over {expected.Length} values");
            if (maxDiff > 1e-4f) failures.Add($"{Path.GetFileName(folder)}: logits differ by {maxDiff}");

            var greedy = root.GetProperty("greedy");
            var prompt = greedy.GetProperty("prompt").EnumerateArray().Select(x => x.GetInt32()).ToArray();
            var want = greedy.GetProperty("new_tokens").EnumerateArray().Select(x => x.GetInt32()).ToArray();
            var got = TextGenerator.Generate(model, [prompt], new GenerationOptions { MaxNewTokens = want.Length })[0];
            if (!got.SequenceEqual(want)) failures.Add($"{Path.GetFileName(folder)}: greedy [{string.Join(",", got)}] vs transformers [{string.Join(",", want)}]");
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }
}
