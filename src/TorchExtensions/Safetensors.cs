using LoRAHub.Safetensors;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// safetensors I/O onto TorchSharp tensors through LoRAHub.Safetensors, which validates every header (offsets, sizes,
/// dtypes, overlaps) before a byte is read and writes atomically; TorchSharp.PyBridge's reader trusts the header.
/// </summary>
public static partial class torchx
{
    /// <summary>Writes tensors to a safetensors file atomically (temp file + rename), in the dictionary's order.</summary>
    public static void save_safetensors(IReadOnlyDictionary<string, Tensor> tensors, string path, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var entries = tensors.Select(kv =>
        {
            var t = kv.Value;
            return new SafetensorsEntry(kv.Key, SafetensorsTypes.ToFile(t.dtype), t.shape, t.numel() * t.element_size(), stream => write_bytes(t, stream));
        });
        SafetensorsWriter.Write(path, entries, metadata);
    }

    /// <summary>
    /// Copies the tensors of a safetensors file into <paramref name="targets"/> by key (load_state_dict for a flat dict):
    /// every target must be in the file with its shape; the file may hold more. Throws InvalidDataException naming the key.
    /// </summary>
    public static void load_safetensors_into(IReadOnlyDictionary<string, Tensor> targets, string path)
    {
        using var file = ShardedSafetensors.Open(path);
        using var _ = no_grad();
        foreach (var (key, target) in targets)
        {
            if (!file.TryGetInfo(key, out var info)) throw new InvalidDataException($"{path} lacks '{key}'");
            if (!info.Shape.SequenceEqual(target.shape))
                throw new InvalidDataException($"'{key}' in {path} has shape [{string.Join(", ", info.Shape)}]; the model needs [{string.Join(", ", target.shape)}]");
            using var loaded = frombuffer(file.GetBytes(key), info.Shape, SafetensorsTypes.ToTorch(info.DType, path, key), target.device);
            target.copy_(loaded);
        }
    }

    /// <summary>Reads every tensor of a safetensors file (or sharded folder) onto a device, in the file's order.</summary>
    public static Dictionary<string, Tensor> load_safetensors(string path, Device? device = null)
    {
        using var file = ShardedSafetensors.Open(path);
        var result = new Dictionary<string, Tensor>();
        try
        {
            foreach (var name in file.Names)
            {
                var info = file.Info(name);
                result[name] = frombuffer(file.GetBytes(name), info.Shape, SafetensorsTypes.ToTorch(info.DType, path, name), device);
            }
        }
        catch
        {
            foreach (var t in result.Values) t.Dispose();
            throw;
        }
        return result;
    }

    /// <summary>
    /// A new tensor holding a copy of <paramref name="bytes"/> (the raw little-endian elements, e.g. a mapped safetensors
    /// entry) with the given shape and dtype, on <paramref name="device"/> (CPU by default).
    /// </summary>
    public static unsafe Tensor frombuffer(ReadOnlySpan<byte> bytes, long[] shape, ScalarType dtype, Device? device = null)
    {
        var cpu = empty(shape, dtype, CPU);
        try
        {
            var length = cpu.numel() * cpu.element_size();
            if (bytes.Length != length)
                throw new ArgumentException($"{bytes.Length} bytes cannot fill a {dtype} tensor of shape [{string.Join(", ", shape)}] ({length} bytes)");
            if (length > 0)
                fixed (byte* source = bytes)
                    Buffer.MemoryCopy(source, (void*)data_ptr(cpu), length, length);
            if (device is null || device.type == DeviceType.CPU) return cpu;
            var moved = cpu.to(device);
            cpu.Dispose();
            return moved;
        }
        catch
        {
            cpu.Dispose();
            throw;
        }
    }

    /// <summary>Writes the tensor's elements (row-major, little-endian) to a stream, through host memory for device tensors.</summary>
    public static unsafe void write_bytes(Tensor tensor, Stream stream)
    {
        using var scope = NewDisposeScope();
        var host = tensor.detach();
        if (host.device_type != DeviceType.CPU) host = host.cpu();
        host = host.contiguous();
        var length = host.numel() * host.element_size();
        var p = (byte*)data_ptr(host);
        const int Chunk = 1 << 26;
        for (long done = 0; done < length; done += Chunk)
            stream.Write(new ReadOnlySpan<byte>(p + done, (int)Math.Min(Chunk, length - done)));
    }
}
