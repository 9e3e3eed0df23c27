using System.Globalization;
using System.Runtime.InteropServices;

namespace LoRAHub.Safetensors;

/// <summary>
/// Deterministic fault injection for crash-consistency tests, off unless <c>LORAHUB_FAULT_AT</c> is set.
/// <para>
/// A writer that must survive a crash (a checkpoint) opens a <see cref="Scope"/> named by its step; inside it every
/// durable operation is an event numbered from 1: each file written through <see cref="AtomicFile"/> (its bytes
/// counted as they are written) and each named point (<see cref="Point"/>: folder renames, deletions). The variable
/// <c>LORAHUB_FAULT_AT=&lt;scope&gt;:&lt;event&gt;:&lt;byte&gt;[:enospc]</c> stops the process with SIGKILL when event
/// <c>event</c> of scope <c>scope</c> has written <c>byte</c> bytes (the bytes so far are handed to the kernel first, so
/// the torn file really is on disk); <c>byte</c> = <c>end</c> fires after the whole file is written and flushed, just
/// before its rename. Event 0 fires when the scope opens, before anything is written. With <c>:enospc</c> it throws
/// IOException "No space left on device" instead of killing, as a full disk would.
/// <c>LORAHUB_FAULT_TRACE=1</c> prints every event to standard error ("fault-trace &lt;scope&gt; &lt;event&gt; &lt;name&gt; start",
/// and for a file also "... end &lt;bytes&gt;"), so a test can list the points to aim at. docs/reliability.md has the test.
/// </para>
/// </summary>
public static class WriteFaults
{
    public const string Variable = "LORAHUB_FAULT_AT";
    public const string TraceVariable = "LORAHUB_FAULT_TRACE";
    public const long AtEnd = -1;

    private static Fault? Planned = Parse(Environment.GetEnvironmentVariable(Variable));
    private static readonly bool Tracing = Environment.GetEnvironmentVariable(TraceVariable) == "1";
    private static readonly AsyncLocal<ScopeState?> Current = new();

    private sealed record Fault(long Scope, int Event, long Byte, bool NoSpace);

    private sealed class ScopeState(long id)
    {
        public long Id { get; } = id;
        public int Events { get; set; }
    }

    /// <summary>Whether any event can fire or be traced (writers skip the counting stream otherwise).</summary>
    public static bool Active => Planned is not null || Tracing;

    /// <summary>
    /// Plans a fault in this process, as the variable would (in-process tests use <c>:enospc</c>, since a kill would end
    /// the test run); disposing the result restores the previous plan.
    /// </summary>
    public static IDisposable Inject(string spec)
    {
        var previous = Planned;
        Planned = Parse(spec);
        return new Restore(() => Planned = previous);
    }

    /// <summary>Opens the scope of one crash-consistent write (a checkpoint of step <paramref name="id"/>).</summary>
    public static IDisposable Scope(long id)
    {
        var previous = Current.Value;
        var state = new ScopeState(id);
        Current.Value = state;
        Hit(state, 0, "scope-open", 0);
        return new Restore(() => Current.Value = previous);
    }

    /// <summary>A named durable step (a rename, a deletion) inside the current scope: one event, fired before it happens.</summary>
    public static void Point(string name)
    {
        if (Current.Value is { } state) Hit(state, ++state.Events, name, 0);
    }

    /// <summary>Wraps a file being written inside the current scope so that its bytes are counted; otherwise returns it.</summary>
    /// <param name="beforeCommit">Call after the content is complete and flushed, just before the rename.</param>
    internal static Stream Track(FileStream stream, string name, out Action beforeCommit)
    {
        beforeCommit = () => { };
        if (!Active || Current.Value is not { } state) return stream;
        var index = ++state.Events;
        Hit(state, index, name, 0, stream);
        var counting = new CountingStream(stream, written => Hit(state, index, name, written, stream));
        beforeCommit = () =>
        {
            if (Tracing) Console.Error.WriteLine($"fault-trace {state.Id} {index} {name} end {counting.Written}");
            if (Planned is { } f && f.Scope == state.Id && f.Event == index && f.Byte == AtEnd) Fire(f, stream);
        };
        return counting;
    }

    private static void Hit(ScopeState state, int index, string name, long written, FileStream? stream = null)
    {
        if (Tracing && written == 0) Console.Error.WriteLine($"fault-trace {state.Id} {index} {name} start");
        if (Planned is { } f && f.Scope == state.Id && f.Event == index && f.Byte == written) Fire(f, stream);
    }

    private static void Fire(Fault fault, FileStream? flushFirst)
    {
        if (fault.NoSpace) throw new IOException("No space left on device (injected by " + Variable + ")", 28);
        // The bytes written so far go to the kernel, so the torn file is on disk as a crash would leave it.
        flushFirst?.Flush();
        Console.Out.Flush();
        Console.Error.Flush();
        if (OperatingSystem.IsWindows()) Environment.FailFast("fault injected by " + Variable);
        kill(getpid(), 9);
        Thread.Sleep(Timeout.Infinite);
    }

    private static Fault? Parse(string? text)
    {
        if (string.IsNullOrWhiteSpace(text)) return null;
        var parts = text.Split(':');
        if (parts.Length is < 3 or > 4 || !long.TryParse(parts[0], CultureInfo.InvariantCulture, out var scope)
            || !int.TryParse(parts[1], CultureInfo.InvariantCulture, out var index)
            || !(parts[2] == "end" || long.TryParse(parts[2], CultureInfo.InvariantCulture, out _))
            || (parts.Length == 4 && parts[3] != "enospc"))
            throw new ArgumentException($"{Variable}='{text}': expected <scope>:<event>:<byte>|end[:enospc]");
        var at = parts[2] == "end" ? AtEnd : long.Parse(parts[2], CultureInfo.InvariantCulture);
        return new Fault(scope, index, at, parts.Length == 4);
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int kill(int pid, int signal);

    [DllImport("libc")]
    private static extern int getpid();

    private sealed class Restore(Action action) : IDisposable
    {
        public void Dispose() => action();
    }

    /// <summary>Counts bytes and fires at the exact byte: a write that crosses the fault offset is split there.</summary>
    private sealed class CountingStream(FileStream inner, Action<long> at) : Stream
    {
        public long Written { get; private set; }
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => Written;
        public override long Position { get => Written; set => throw new NotSupportedException(); }

        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

        public override void Write(ReadOnlySpan<byte> buffer)
        {
            // Byte by byte would be slow for gigabytes; a fault lies at one offset, so a write is split only there.
            while (!buffer.IsEmpty)
            {
                var take = buffer.Length;
                if (Planned is { Byte: > 0 } f && f.Byte > Written && f.Byte <= Written + take) take = (int)(f.Byte - Written);
                inner.Write(buffer[..take]);
                Written += take;
                buffer = buffer[take..];
                if (Planned is { Byte: > 0 } g && g.Byte == Written) at(Written);
            }
        }

        public override void WriteByte(byte value) => Write([value]);
        public override void Flush() => inner.Flush();
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }
}
