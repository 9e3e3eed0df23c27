using System.Diagnostics;
using System.Reflection;
using LoRAHub.Training;

namespace LoRAHub.Host.Scripting;

/// <summary>Compiles (or loads) and runs a script, turning compile errors and exceptions into messages and exit codes.</summary>
public sealed class ScriptRunner(ScriptCompiler compiler)
{
    /// <param name="createGlobals">Builds the script's globals, given the script's folder.</param>
    /// <param name="error">Where errors (and, with <paramref name="verbose"/>, timings) are written.</param>
    public async Task<ScriptRunResult> RunAsync(string scriptPath, Func<string, ScriptHost> createGlobals, TextWriter error, bool verbose = false)
    {
        var fullPath = Path.GetFullPath(scriptPath);
        CompiledScript script;
        try
        {
            script = compiler.Load(fullPath);
        }
        catch (ScriptCompilationException e)
        {
            foreach (var line in e.Errors) error.WriteLine(line);
            return new ScriptRunResult(ExitCodes.ScriptError, null);
        }
        foreach (var warning in script.Warnings) error.WriteLine(warning);
        if (verbose)
            error.WriteLine(script.FromCache
                ? $"loaded from cache in {script.Elapsed.TotalMilliseconds:0} ms"
                : $"compiled in {script.Elapsed.TotalMilliseconds:0} ms");

        try
        {
            var globals = createGlobals(Path.GetDirectoryName(fullPath)!);
            // Train calls that pass no token stop on the host's (Ctrl+C), without every script passing Cancellation.
            using (TrainingCancellation.Use(globals.Cancellation)) await script.Invoke(globals);
            return new ScriptRunResult(ExitCodes.Ok, script);
        }
        catch (Exception e) when (InnermostCause(e) is TrainingStoppedException stopped)
        {
            // Ctrl+C during Train: the checkpoint is written and the script ends here, as an interrupted program does.
            error.WriteLine(stopped.Message);
            return new ScriptRunResult(ExitCodes.Interrupted, script);
        }
        catch (Exception e)
        {
            error.WriteLine(DescribeFailure(e, script.SourceFiles));
            if (verbose) error.WriteLine(e.ToString());
            return new ScriptRunResult(ExitCodes.ScriptError, script);
        }
    }

    /// <summary>
    /// <c>path(line): error: unhandled Type: message</c>, located at the innermost frame in the script's own files. A
    /// wrapper (TargetInvocationException, TypeInitializationException, an AggregateException of one) is followed by
    /// its innermost cause, <c>---&gt; Type: message</c>, whose message is the one that says what went wrong.
    /// </summary>
    public static string DescribeFailure(Exception exception, IReadOnlyList<string> scriptFiles)
    {
        var cause = InnermostCause(exception);
        var frame = Frames(cause).Concat(ReferenceEquals(cause, exception) ? [] : Frames(exception))
            .FirstOrDefault(f => f.GetFileName() is { } file && scriptFiles.Contains(file, StringComparer.Ordinal));
        var location = frame is null ? scriptFiles[0] : $"{frame.GetFileName()}({frame.GetFileLineNumber()},{frame.GetFileColumnNumber()})";
        var text = $"{location}: error: unhandled {exception.GetType().FullName}: {exception.Message}";
        return ReferenceEquals(cause, exception) ? text : $"{text} ---> {cause.GetType().FullName}: {cause.Message}";
    }

    /// <summary>The exception itself, or the innermost cause inside wrappers that carry no message of their own.</summary>
    public static Exception InnermostCause(Exception exception)
    {
        var e = exception;
        while (e is TargetInvocationException or TypeInitializationException or AggregateException { InnerExceptions.Count: 1 }
               && e.InnerException is { } inner)
            e = inner;
        return e;
    }

    private static StackFrame[] Frames(Exception e) => new StackTrace(e, fNeedFileInfo: true).GetFrames();
}

/// <summary>The exit code, and the script that ran (null when it did not compile).</summary>
public sealed record ScriptRunResult(int ExitCode, CompiledScript? Script);
