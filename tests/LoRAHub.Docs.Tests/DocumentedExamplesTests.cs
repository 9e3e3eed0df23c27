using System.Text.RegularExpressions;
using LoRAHub.Host.Scripting;
using Microsoft.Extensions.Logging.Abstractions;

namespace LoRAHub.Docs.Tests;

/// <summary>
/// Every C# block of README.md and docs/**/*.md compiles as a script does under `dotnet loraHub run` (the host's
/// ScriptCompiler, its references and default imports), so an example cannot rot unnoticed. A block opened with
/// <c>```csharp fragment</c> (a piece of a class, a signature) is skipped; keep those rare.
/// </summary>
public sealed partial class DocumentedExamplesTests
{
    [GeneratedRegex(@"^```(?:csharp|cs)(?<info>[^\n]*)\n(?<code>.*?)^```\s*$", RegexOptions.Multiline | RegexOptions.Singleline)]
    private static partial Regex CSharpBlock();

    public static TheoryData<string, int> Blocks()
    {
        var data = new TheoryData<string, int>();
        foreach (var (file, line, _, _) in Extract()) data.Add(file, line);
        return data;
    }

    private static IEnumerable<(string File, int Line, string Info, string Code)> Extract()
    {
        var repo = RepoRoot();
        var files = new[] { Path.Combine(repo, "README.md") }
            .Concat(Directory.GetFiles(Path.Combine(repo, "docs"), "*.md", SearchOption.AllDirectories).Order(StringComparer.Ordinal));
        foreach (var file in files)
        {
            var text = File.ReadAllText(file).ReplaceLineEndings("\n");
            foreach (Match m in CSharpBlock().Matches(text))
                yield return (Path.GetRelativePath(repo, file), text[..m.Index].Count(c => c == '\n') + 1, m.Groups["info"].Value.Trim(), m.Groups["code"].Value);
        }
    }

    [Theory]
    [MemberData(nameof(Blocks))]
    public void Example_compiles_as_a_script(string file, int line)
    {
        var block = Extract().Single(b => b.File == file && b.Line == line);
        if (block.Info.Split(' ').Contains("fragment")) return;
        var folder = Path.Combine(Path.GetTempPath(), "lorahub-docs-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(folder);
        try
        {
            var script = Path.Combine(folder, $"{Path.GetFileNameWithoutExtension(file)}-line{line}.csx");
            File.WriteAllText(script, block.Code);
            var compiler = new ScriptCompiler(ScriptReferences.CreateDefault(AppContext.BaseDirectory), new ScriptCache(Path.Combine(folder, "cache")),
                NullLogger<ScriptCompiler>.Instance);
            try
            {
                compiler.Load(script);
            }
            catch (ScriptCompilationException e)
            {
                Assert.Fail($"{file}, the C# block at line {line}, does not compile as a script:\n{string.Join("\n", e.Errors)}\n" +
                            "(mark a block that is deliberately a fragment with ```csharp fragment)");
            }
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public void The_readme_and_the_cli_and_serve_pages_have_examples()
    {
        var files = Extract().Select(b => b.File).ToHashSet();
        Assert.Contains("README.md", files);
        Assert.Contains(Path.Combine("docs", "cli.md"), files);
    }

    private static string RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "LoRAHub.sln"))) return dir.FullName;
        throw new InvalidOperationException("repository root (LoRAHub.sln) not found above " + AppContext.BaseDirectory);
    }
}
