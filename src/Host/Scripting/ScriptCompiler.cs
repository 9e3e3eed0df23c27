using System.Collections.Immutable;
using System.Diagnostics;
using System.Reflection;
using System.Text;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp.Scripting;
using Microsoft.CodeAnalysis.Emit;
using Microsoft.CodeAnalysis.Scripting;
using Microsoft.Extensions.Logging;

namespace LoRAHub.Host.Scripting;

/// <summary>Compiles `.csx` files against <see cref="ScriptReferences"/>, or loads them from the <see cref="ScriptCache"/>.</summary>
public sealed class ScriptCompiler(ScriptReferences references, ScriptCache cache, ILogger<ScriptCompiler> logger)
{
    /// <exception cref="ScriptCompilationException">The script has compile errors.</exception>
    public CompiledScript Load(string scriptPath)
    {
        var clock = Stopwatch.StartNew();
        var sources = ScriptSources.Collect(scriptPath);
        if (sources.Count == 0) throw new FileNotFoundException($"script not found: {scriptPath}", scriptPath);
        var files = sources.Select(s => s.Path).ToList();
        var key = ScriptCache.Key(sources, references);

        if (cache.TryRead(key) is { } cached)
        {
            var assembly = Assembly.Load(cached);
            logger.LogDebug("script {Script} loaded from cache {Path} in {Ms} ms", files[0], cache.PathFor(key), clock.ElapsedMilliseconds);
            return new CompiledScript(assembly, fromCache: true, clock.Elapsed, files);
        }

        var (image, warnings) = Compile(files[0], sources[0].Text);
        cache.Write(key, image);
        var compiled = Assembly.Load(image);
        logger.LogDebug("script {Script} compiled in {Ms} ms", files[0], clock.ElapsedMilliseconds);
        return new CompiledScript(compiled, fromCache: false, clock.Elapsed, files) { Warnings = warnings };
    }

    private (byte[] Image, IReadOnlyList<string> Warnings) Compile(string path, string text)
    {
        var directory = Path.GetDirectoryName(path)!;
        var options = ScriptOptions.Default
            .WithFilePath(path)
            .WithFileEncoding(Encoding.UTF8)
            .WithEmitDebugInformation(true)
            .AddReferences(references.Assemblies)
            .WithImports(references.ExistingImports())
            .WithSourceResolver(new SourceFileResolver(ImmutableArray<string>.Empty, directory))
            .WithMetadataResolver(ScriptMetadataResolver.Default.WithBaseDirectory(directory));
        var compilation = CSharpScript.Create<object>(text, options, globalsType: typeof(ScriptHost)).GetCompilation();

        using var pe = new MemoryStream();
        // The PDB travels inside the assembly so that cached scripts keep file and line numbers in stack traces.
        var result = compilation.Emit(pe, options: new EmitOptions(debugInformationFormat: DebugInformationFormat.Embedded));
        var errors = result.Diagnostics.Where(d => d.Severity == DiagnosticSeverity.Error).Select(d => d.ToString()).ToList();
        if (!result.Success) throw new ScriptCompilationException(errors.Count > 0 ? errors : ["compilation failed without diagnostics"]);
        return (pe.ToArray(), ScriptWarnings.Find(compilation));
    }
}
