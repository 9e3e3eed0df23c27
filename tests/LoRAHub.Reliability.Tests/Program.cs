namespace LoRAHub.Reliability.Tests;

/// <summary>
/// The test assembly doubles as the child process that crash tests kill: `dotnet LoRAHub.Reliability.Tests.dll
/// train-child ...` runs a small training (see <see cref="TrainChild"/>). The test runner does not use this entry point.
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        if (args.Length > 0 && args[0] == TrainChild.Verb) return TrainChild.Run(args[1..]);
        if (args.Length > 0 && args[0] == OomChild.Verb) return OomChild.Run(args[1..]);
        if (args.Length > 1 && args[0] == "write-corpus") return WriteCorpus(args[1]);
        Console.Error.WriteLine($"usage: LoRAHub.Reliability.Tests {TrainChild.Verb} <output dir> <steps> [resume] [options]\n" +
                                $"       LoRAHub.Reliability.Tests {OomChild.Verb} <output dir> [device=cuda] [huge-batch=N] [steps=N]\n" +
                                "       LoRAHub.Reliability.Tests write-corpus <folder>   (every bad-input case, one folder each, to reproduce by hand)");
        return 2;
    }

    /// <summary>Writes every case of the bad-input corpus to &lt;folder&gt;/&lt;kind&gt;/&lt;NNN&gt; with a README naming it.</summary>
    private static int WriteCorpus(string root)
    {
        var cases = Corpus.SafetensorsCases.All().Concat(Corpus.DataCases.All()).Concat(Corpus.ModelCases.All()).ToList();
        foreach (var (input, i) in cases.Select((c, i) => (c, i)))
        {
            var folder = Path.Combine(root, input.Kind, $"{i:D3}");
            Directory.CreateDirectory(folder);
            var named = input.Write(folder);
            File.WriteAllText(Path.Combine(folder, "CASE.txt"), $"{input}\nowner: {input.Owner}\nfile at fault: {named}\nmay load: {input.MayLoad}\n");
        }
        Console.Out.WriteLine($"{cases.Count} cases written under {root}");
        return 0;
    }
}
