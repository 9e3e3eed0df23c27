using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace LoRAHub.Distributed;

/// <summary>
/// A small key-value rendezvous store over TCP (torch.distributed's TCPStore): rank 0 serves it at
/// MASTER_ADDR:MASTER_PORT, every rank (rank 0 included) connects as a client. Used to hand NCCL's unique id to the
/// ranks and to publish heartbeats a watchdog reads to name a silent rank. Not a collective engine.
/// Protocol: one text line per request ("SET key base64", "GET key", "AGE key"), one line per answer.
/// </summary>
public sealed class TcpStore : IDisposable
{
    private readonly TcpListener? listener;
    private readonly Dictionary<string, (string value, long setTicks)> data = new();
    private readonly List<TcpClient> served = new();
    private readonly TcpClient client;
    private readonly StreamReader reader;
    private readonly StreamWriter writer;
    private readonly object clientGate = new();
    private readonly TimeSpan timeout;
    private volatile bool disposed;

    public TcpStore(string host, int port, bool isServer, TimeSpan timeout)
    {
        this.timeout = timeout;
        if (isServer)
        {
            listener = new TcpListener(IPAddress.Any, port);
            try
            {
                listener.Start();
            }
            catch (SocketException e)
            {
                throw new DistributedException($"rank 0 cannot serve the rendezvous store on port {port} ({e.SocketErrorCode}): " +
                    "another run uses it; pick another --master-port (MASTER_PORT)", 0, e);
            }
            new Thread(Accept) { IsBackground = true, Name = "lorahub-store" }.Start();
        }
        client = Connect(host, port, timeout);
        var stream = client.GetStream();
        reader = new StreamReader(stream, Encoding.ASCII);
        writer = new StreamWriter(stream, Encoding.ASCII) { AutoFlush = true, NewLine = "\n" };
    }

    private static TcpClient Connect(string host, int port, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            var c = new TcpClient { NoDelay = true };
            try
            {
                c.Connect(host, port);
                return c;
            }
            catch (SocketException e)
            {
                c.Dispose();
                if (clock.Elapsed > timeout)
                    throw new DistributedException($"cannot reach the rendezvous store of rank 0 at {host}:{port} within {timeout.TotalSeconds:0} s " +
                        $"({e.SocketErrorCode}): is rank 0 running, and are MASTER_ADDR/MASTER_PORT the same on every rank?", 0, e);
                Thread.Sleep(100);
            }
        }
    }

    public void Set(string key, byte[] value) => Request($"SET {key} {Convert.ToBase64String(value)}");

    /// <summary>Waits until the key is set (up to the timeout), then returns its value.</summary>
    public byte[] Get(string key) => Convert.FromBase64String(Request($"GET {key}"));

    /// <summary>Time since the key was last set by any rank, on the server's clock; null if never set.</summary>
    public TimeSpan? Age(string key)
    {
        var answer = Request($"AGE {key}");
        return answer == "-" ? null : TimeSpan.FromMilliseconds(long.Parse(answer));
    }

    private string Request(string line)
    {
        lock (clientGate)
        {
            try
            {
                writer.WriteLine(line);
                var answer = reader.ReadLine() ?? throw new IOException("connection closed");
                if (answer.StartsWith("ERR ", StringComparison.Ordinal)) throw new DistributedException($"rendezvous store: {answer[4..]}");
                return answer[3..];
            }
            catch (IOException e)
            {
                throw new DistributedException($"lost the rendezvous store served by rank 0 ({e.Message}): rank 0 has likely ended", 0, e);
            }
        }
    }

    private void Accept()
    {
        while (!disposed)
        {
            TcpClient c;
            try { c = listener!.AcceptTcpClient(); }
            catch (Exception) { return; }
            c.NoDelay = true;
            lock (served) served.Add(c);
            new Thread(() => Serve(c)) { IsBackground = true, Name = "lorahub-store-client" }.Start();
        }
    }

    private void Serve(TcpClient c)
    {
        try
        {
            using var stream = c.GetStream();
            using var r = new StreamReader(stream, Encoding.ASCII);
            using var w = new StreamWriter(stream, Encoding.ASCII) { AutoFlush = true, NewLine = "\n" };
            while (r.ReadLine() is { } line)
            {
                var parts = line.Split(' ');
                w.WriteLine(Answer(parts));
            }
        }
        catch (Exception) { /* a client went away */ }
    }

    private string Answer(string[] parts)
    {
        switch (parts[0])
        {
            case "SET" when parts.Length == 3:
                lock (data)
                {
                    data[parts[1]] = (parts[2], Stopwatch.GetTimestamp());
                    Monitor.PulseAll(data);
                }
                return "OK ";
            case "GET" when parts.Length == 2:
                var clock = Stopwatch.StartNew();
                lock (data)
                {
                    while (!data.ContainsKey(parts[1]))
                    {
                        var left = timeout - clock.Elapsed;
                        if (left <= TimeSpan.Zero || disposed) return $"ERR key '{parts[1]}' was not set within {timeout.TotalSeconds:0} s";
                        Monitor.Wait(data, left);
                    }
                    return "OK " + data[parts[1]].value;
                }
            case "AGE" when parts.Length == 2:
                lock (data)
                    return data.TryGetValue(parts[1], out var v) ? "OK " + (long)Stopwatch.GetElapsedTime(v.setTicks).TotalMilliseconds : "OK -";
            default:
                return "ERR bad request";
        }
    }

    public void Dispose()
    {
        disposed = true;
        client.Dispose();
        listener?.Stop();
        lock (served)
            foreach (var c in served) c.Dispose();
        lock (data) Monitor.PulseAll(data);
    }
}
