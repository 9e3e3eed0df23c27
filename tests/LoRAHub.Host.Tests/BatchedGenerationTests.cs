using LoRAHub.Abstractions;
using LoRAHub.Host.Everyday;
using LoRAHub.Models.Generation;

namespace LoRAHub.Host.Tests;

/// <summary>
/// The mixed-batch generation serve and generate use: rows with their own options and adapters give what they give
/// alone (greedy, and sampling from each row's own seeded generator), and stop strings end text exactly.
/// </summary>
[Collection(EmbeddedModelCollection.Name)]
public sealed class BatchedGenerationTests(EmbeddedModelFixture fixture)
{
    [Fact]
    public void Rows_with_their_own_options_and_adapters_equal_each_row_alone()
    {
        using var model = LoadedModel.Load(fixture.BaseModel);
        using var hub = new AdapterHub(model.Model, fixture.Methods);
        hub.Register("a", fixture.AdapterA);
        hub.Register("b", fixture.AdapterB);
        var tok = model.Tokenizer;
        var greedy = new GenerationOptions { MaxNewTokens = 9, PadTokenId = tok.PadTokenId };
        var rows = new (string Prompt, GenerationOptions Options, string Adapter)[]
        {
            ("copy abcd = ", greedy, "a"),
            ("the red fox", greedy with { MaxNewTokens = 4 }, IAdapterSet.BaseName),
            ("the red fox", greedy with { Temperature = 1.0, TopK = 10, Seed = 5 }, "b"),
            ("12 13 14", greedy with { Temperature = 0.7, TopP = 0.9, Seed = 6 }, "a"),
        };

        var (set, names, scope) = hub.Prepare(rows.Select(r => r.Adapter).ToList());
        int[][] batched;
        using (scope)
            batched = TextGenerator.Generate(model.Model, rows.Select((r, i) => new GenerationRow(tok.Encode(r.Prompt), r.Options, names[i])).ToList(), set);

        for (var i = 0; i < rows.Length; i++)
        {
            var (aloneSet, aloneNames, aloneScope) = hub.Prepare([rows[i].Adapter]);
            using (aloneScope)
            {
                var alone = TextGenerator.Generate(model.Model, [new GenerationRow(tok.Encode(rows[i].Prompt), rows[i].Options, aloneNames[0])], aloneSet)[0];
                Assert.Equal(alone, batched[i]);
            }
        }
        Assert.Equal(4, batched[1].Length); // each row stops at its own max_tokens
    }

    [Fact]
    public void Text_streams_hold_back_a_possible_stop_string_and_cut_it_off()
    {
        var tok = Tokenizer();
        var stream = new TextStream(tok, ["= x"]);
        var pieces = "ab = y= x tail".Select(c => stream.Add(tok.TokenToId(c.ToString())!.Value)).ToList();

        Assert.Equal("ab = y", string.Concat(pieces) + stream.Flush());
        Assert.True(stream.Stopped);
        Assert.Equal(["a", "b", " ", "", "", "= y"], pieces.Take(6)); // "=" and "= " might start the stop string: held until "y"
    }

    private LoRAHub.Models.Tokenization.Tokenizer Tokenizer() => LoRAHub.Models.Tokenization.Tokenizer.FromFolder(fixture.BaseModel);
}
