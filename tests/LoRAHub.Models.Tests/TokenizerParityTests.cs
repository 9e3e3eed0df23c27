using System.Text.Json;
using LoRAHub.Models.Tokenization;

namespace LoRAHub.Models.Tests;

/// <summary>A fact skipped, with the reason, when fixtures/make_tokenizer_fixtures.py has not been run.</summary>
public sealed class TokenizerFixtureFactAttribute : FactAttribute
{
    public TokenizerFixtureFactAttribute()
    {
        if (TokenizerParityTests.Folders().Length == 0)
            Skip = "no tokenizer fixtures: run `python tests/LoRAHub.Models.Tests/fixtures/make_tokenizer_fixtures.py` (needs the tokenizers package)";
    }
}

/// <summary>Our ids and decoded text against the tokenizers library on tokenizer.json files in real models' formats.</summary>
public sealed class TokenizerParityTests
{
    public static string[] Folders()
    {
        var root = Path.Combine(ParityTests.FixtureRoot(), "tokenizers");
        return Directory.Exists(root)
            ? Directory.GetDirectories(root).Where(d => File.Exists(Path.Combine(d, "expected.json"))).OrderBy(d => d).ToArray()
            : [];
    }

    [TokenizerFixtureFact]
    public void Ids_and_decoded_text_match_tokenizers()
    {
        var failures = new List<string>();
        foreach (var folder in Folders())
        {
            var name = Path.GetFileName(folder);
            var tok = Tokenizer.FromFile(Path.Combine(folder, "tokenizer.json"));
            using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "expected.json")));
            var root = doc.RootElement;
            var texts = root.GetProperty("texts").EnumerateArray().Select(t => t.GetString()!).ToArray();
            for (var i = 0; i < texts.Length; i++)
            {
                var want = root.GetProperty("ids")[i].EnumerateArray().Select(x => x.GetInt32()).ToArray();
                var got = tok.Encode(texts[i]);
                if (!got.SequenceEqual(want))
                    failures.Add($"{name} encode {JsonSerializer.Serialize(texts[i])}: [{string.Join(",", got)}] vs tokenizers [{string.Join(",", want)}]");
                foreach (var (key, skip) in new[] { ("decoded", true), ("decoded_with_special", false) })
                {
                    var wantText = root.GetProperty(key)[i].GetString();
                    var gotText = tok.Decode(want, skip);
                    if (gotText != wantText)
                        failures.Add($"{name} {key} {JsonSerializer.Serialize(texts[i])}: {JsonSerializer.Serialize(gotText)} vs tokenizers {JsonSerializer.Serialize(wantText)}");
                }
            }
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }
}
