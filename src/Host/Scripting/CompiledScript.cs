using System.Reflection;

namespace LoRAHub.Host.Scripting;

/// <summary>
/// A script assembly ready to run. Roslyn compiles a script to a <c>Submission#0</c> type whose static
/// <c>&lt;Factory&gt;</c> method takes the submission array (globals first) and returns the script's task.
/// </summary>
public sealed class CompiledScript(Assembly assembly, bool fromCache, TimeSpan elapsed, IReadOnlyList<string> sourceFiles)
{
    private const string SubmissionType = "Submission#0";
    private const string FactoryMethod = "<Factory>";

    public Assembly Assembly { get; } = assembly;

    /// <summary>True when the assembly came from the cache and nothing was compiled.</summary>
    public bool FromCache { get; } = fromCache;

    /// <summary>Time to compile, or to load from the cache.</summary>
    public TimeSpan Elapsed { get; } = elapsed;

    /// <summary>The script and its #load'ed files (full paths), used to find the script's frame in a stack trace.</summary>
    public IReadOnlyList<string> SourceFiles { get; } = sourceFiles;

    /// <summary>The host's own warnings (<see cref="ScriptWarnings"/>), found when the script compiles; none from the cache.</summary>
    public IReadOnlyList<string> Warnings { get; init; } = [];

    public Task<object> Invoke(ScriptHost globals)
    {
        var factory = Assembly.GetType(SubmissionType)?.GetMethod(FactoryMethod, BindingFlags.Public | BindingFlags.Static)
                      ?? throw new InvalidOperationException($"{Assembly.FullName} has no {SubmissionType}.{FactoryMethod}: not a script assembly");
        try
        {
            return (Task<object>)factory.Invoke(null, [new object?[] { globals, null }])!;
        }
        catch (TargetInvocationException e) when (e.InnerException is not null)
        {
            return Task.FromException<object>(e.InnerException);
        }
    }
}
