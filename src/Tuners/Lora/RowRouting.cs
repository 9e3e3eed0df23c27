using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// The rows of a mixed batch grouped by adapter (PEFT's adapter_names), shared by every LoRA layer of one
/// <see cref="LoraAdapter.UseAdapterPerRow"/> scope. Each group's row indices are uploaded once per device: copying a
/// host array to the GPU waits for the stream, and doing that in every layer at every decoding step stalled generation.
/// </summary>
public sealed class RowRouting : IDisposable
{
    private readonly (string Name, long[] Rows)[] groups;
    private readonly Dictionary<string, (string Name, Tensor Index)[]> onDevice = new();

    public RowRouting(IReadOnlyList<string> rows)
    {
        Count = rows.Count;
        groups = rows.Select((name, row) => (name, row)).GroupBy(r => r.name)
            .Select(g => (g.Key, g.Select(r => (long)r.row).ToArray())).ToArray();
    }

    /// <summary>The number of rows the batch must have.</summary>
    public int Count { get; }

    /// <summary>Each adapter named by some row, with the indices of its rows on <paramref name="device"/>.</summary>
    public IReadOnlyList<(string Name, Tensor Index)> Groups(Device device)
    {
        lock (onDevice)
        {
            var key = device.ToString();
            if (!onDevice.TryGetValue(key, out var found))
                onDevice[key] = found = groups.Select(g => (g.Name, tensor(g.Rows, device: device).DetachFromDisposeScope())).ToArray();
            return found;
        }
    }

    public void Dispose()
    {
        lock (onDevice)
        {
            foreach (var (_, index) in onDevice.Values.SelectMany(g => g)) index.Dispose();
            onDevice.Clear();
        }
    }
}
