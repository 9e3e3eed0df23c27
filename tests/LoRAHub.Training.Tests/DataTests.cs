namespace LoRAHub.Training.Tests;

public class DataTests : IDisposable
{
    private readonly string dir = Directory.CreateTempSubdirectory("lorahub-data").FullName;
    private static readonly CharTokenizer Tok = new();

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private string Write(params string[] lines)
    {
        var path = Path.Combine(dir, Guid.NewGuid().ToString("N") + ".jsonl");
        File.WriteAllLines(path, lines);
        return path;
    }

    [Fact]
    public void Prompt_tokens_get_no_loss()
    {
        var path = Write("""{"prompt": "ab=", "completion": "bc"}""");
        var e = TextDataset.LoadJsonl(path, Tok).Examples[0];
        Assert.Equal(Tok.Encode("ab=").Concat(Tok.Encode("bc")).Append(1), e.InputIds);
        Assert.Equal(new[] { -100, -100, -100 }.Concat(Tok.Encode("bc")).Append(1), e.Labels);
    }

    [Fact]
    public void Alpaca_records_mask_the_templated_prompt()
    {
        var tok = new CharTokenizer("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:#\n");
        var path = Write("""{"instruction": "say hi", "input": "", "output": "hi"}""");
        var e = TextDataset.LoadJsonl(path, tok).Examples[0];
        var prompt = RecordTokenizer.AlpacaPrompt("say hi", null);
        Assert.Equal(prompt.Length + 3, e.Length);
        Assert.All(e.Labels.Take(prompt.Length), l => Assert.Equal(-100, l));
        Assert.Equal(tok.Encode("hi").Append(1), e.Labels.Skip(prompt.Length));
    }

    [Fact]
    public void Chat_records_learn_only_assistant_turns()
    {
        var path = Write("""{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}, {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]}""");
        var e = TextDataset.LoadJsonl(path, Tok).Examples[0];
        var learned = Tok.Decode(e.Labels.Where(l => l >= 0));
        Assert.Equal("cd\nf\n", learned);
    }

    [Fact]
    public void Malformed_lines_report_file_and_line_or_are_skipped_and_counted()
    {
        var path = Write("""{"text": "abc"}""", "", "{broken", """{"text": 5}""", """{"other": 1}""", """{"text": "ok"}""");
        var e = Assert.Throws<DataRecordException>(() => TextDataset.LoadJsonl(path, Tok));
        Assert.Equal(3, e.Line);
        Assert.Contains($"{path}:3", e.Message);
        Assert.Contains("invalid JSON", e.Message);

        var data = TextDataset.LoadJsonl(path, Tok, onMalformed: MalformedRecordPolicy.Skip);
        Assert.Equal(2, data.Count);
        Assert.Equal(3, data.Skipped);
        Assert.Contains(data.SkipReasons, r => r.Contains(":4: field 'text' must be a string"));
        Assert.Contains(data.SkipReasons, r => r.Contains(":5: record has none of the fields"));
    }

    [Fact]
    public void Loader_pads_masks_shuffles_by_seed_and_packs()
    {
        var examples = Enumerable.Range(0, 10).Select(i => new TokenizedExample(Enumerable.Repeat(i + 2, i % 3 + 1).ToArray(), Enumerable.Repeat(i + 2, i % 3 + 1).ToArray())).ToList();
        var data = new TextDataset(examples);
        using var batch = DataLoader.Collate([examples[0], examples[2]], 0, torch.CPU);
        Assert.Equal(new long[] { 2, 0, 0, 4, 4, 4 }, batch.InputIds.data<long>().ToArray());
        Assert.Equal(new long[] { 2, -100, -100, 4, 4, 4 }, batch.Labels.data<long>().ToArray());
        Assert.Equal(new long[] { 1, 0, 0, 1, 1, 1 }, batch.AttentionMask.data<long>().ToArray());

        long[] Order(long seed)
        {
            var loader = new DataLoader(data, 10, 0, seed);
            using var b = loader.Next(torch.CPU);
            return b.InputIds[.., 0].contiguous().data<long>().ToArray();
        }
        Assert.Equal(Order(1), Order(1));
        Assert.NotEqual(Order(1), Order(2));

        var packed = DataLoader.Pack(examples, 4);
        Assert.All(packed, p => Assert.True(p.Length <= 4));
        Assert.Equal(examples.Sum(e => e.Length), packed.Sum(p => p.Length));
    }

    [Fact]
    public void Split_is_seeded_and_disjoint()
    {
        var data = new TextDataset(Enumerable.Range(0, 20).Select(i => new TokenizedExample([i], [i])).ToList());
        var (train, eval) = data.Split(0.2, 5);
        Assert.Equal(16, train.Count);
        Assert.Equal(4, eval.Count);
        Assert.Empty(train.Examples.Intersect(eval.Examples));
        Assert.Equal(eval.Examples.Select(e => e.InputIds[0]), data.Split(0.2, 5).Eval.Examples.Select(e => e.InputIds[0]));
    }
}
