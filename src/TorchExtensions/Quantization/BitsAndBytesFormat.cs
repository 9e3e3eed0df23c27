using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Quantization;

/// <summary>
/// How bitsandbytes serializes a 4-bit weight (Params4bit + QuantState.as_dict(packed=True)), as transformers writes it
/// into model.safetensors beside config.json's quantization_config. Per Linear weight "W":
/// <list type="bullet">
/// <item>W: uint8 of shape (ceil(n/2), 1), two codes a byte, the first value in the high nibble (kQuantizeBlockwise), no
/// padding to whole blocks; the codes are bitsandbytes' indices (its CUDA kernels decode NF4/FP4 by index, not through
/// quant_map).</item>
/// <item>W.absmax: fp32 per block of blocksize values; with double quantization uint8 codes, one per block.</item>
/// <item>W.quant_map: the 16 code values by index (NF4 ascending; FP4 sign-magnitude order).</item>
/// <item>W.nested_absmax, W.nested_quant_map: double quantization's fp32 scale per 256 absmax codes and its 256-value
/// dynamic code (absmax = nested_quant_map[code] · nested_absmax + nested_offset).</item>
/// <item>W.quant_state.bitsandbytes__nf4 (or __fp4): json.dumps of the non-tensor items as uint8 bytes: quant_type,
/// blocksize, dtype, shape, and nested_blocksize, nested_dtype, nested_offset when double-quantized.</item>
/// </list>
/// Our <see cref="FourBitTensor"/> keeps codes as indices into the SORTED codebook and pads to whole blocks (and the absmax
/// codes to a multiple of 256): reading and writing translate between the two.
/// </summary>
public static class BitsAndBytesFormat
{
    /// <summary>The key suffixes of a 4-bit weight besides the packed weight itself, for <paramref name="quantType"/>.</summary>
    public static string QuantStateSuffix(string quantType) => ".quant_state.bitsandbytes__" + quantType;

    /// <summary>
    /// A <see cref="FourBitTensor"/> on <paramref name="device"/> from the serialized parts of one weight (CPU or any device).
    /// Throws <see cref="InvalidDataException"/> naming <paramref name="key"/> when the parts do not fit together.
    /// </summary>
    public static FourBitTensor Read(string key, Tensor weight, Tensor absmax, Tensor quantMap, Tensor? nestedAbsmax, Tensor? nestedQuantMap,
        Tensor quantState, Device device)
    {
        InvalidDataException Bad(string what) => new($"{key}: not a bitsandbytes 4-bit weight ({what})");
        JsonObject state;
        try
        {
            state = JsonNode.Parse(Encoding.UTF8.GetString(quantState.cpu().to(ScalarType.Byte).data<byte>().ToArray()))!.AsObject();
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or NullReferenceException)
        {
            throw Bad($"its quant_state is not JSON: {e.Message}");
        }
        var quantType = state["quant_type"]?.GetValue<string>() ?? throw Bad("quant_state lacks quant_type");
        if (!FourBit.QuantTypes.Contains(quantType)) throw Bad($"quant_type '{quantType}' is neither nf4 nor fp4");
        var blocksize = state["blocksize"]?.GetValue<int>() ?? throw Bad("quant_state lacks blocksize");
        var shape = state["shape"]?.AsArray().Select(d => d!.GetValue<long>()).ToArray() ?? throw Bad("quant_state lacks shape");
        var n = shape.Aggregate(1L, (a, b) => a * b);
        var blocks = (n + blocksize - 1) / blocksize;
        if (weight.dtype != ScalarType.Byte || weight.numel() != (n + 1) / 2) throw Bad($"the packed weight holds {weight.numel()} {weight.dtype} values; {n} values need {(n + 1) / 2} uint8");
        if (quantMap.numel() != 16) throw Bad($"quant_map has {quantMap.numel()} values, not 16");
        var nested = nestedAbsmax is not null;
        if (nested != (nestedQuantMap is not null) || nested != state.ContainsKey("nested_offset"))
            throw Bad("double quantization needs nested_absmax, nested_quant_map and nested_offset together");

        using var scope = NewDisposeScope();
        using var _ = no_grad();
        // Codes index the file's quant_map; ours index its sorted values: a 256-entry table renumbers both nibbles of each byte.
        var (code, rank) = Sorted(quantMap.to(device)); // on the target device: the file's tensors are on the CPU
        var packed = weight.to(device).reshape(-1);
        packed = Renumber4(packed, rank);
        var padded = blocks * blocksize / 2;
        if (packed.numel() < padded) packed = nn.functional.pad(packed, [0, padded - packed.numel()]);
        Tensor? absmaxF = null, codes = null, scales = null, nestedCode = null;
        double offset = 0;
        if (!nested)
        {
            if (absmax.dtype != ScalarType.Float32 || absmax.numel() != blocks) throw Bad($"absmax must hold {blocks} float32 values");
            absmaxF = absmax.to(device).reshape(-1);
        }
        else
        {
            if ((state["nested_blocksize"]?.GetValue<int>() ?? -1) != FourBit.AbsmaxBlocksize)
                throw Bad($"nested_blocksize must be {FourBit.AbsmaxBlocksize}");
            var nestedBlocks = (blocks + FourBit.AbsmaxBlocksize - 1) / FourBit.AbsmaxBlocksize;
            if (absmax.dtype != ScalarType.Byte || absmax.numel() != blocks) throw Bad($"double-quantized absmax must hold {blocks} uint8 codes");
            if (nestedAbsmax!.dtype != ScalarType.Float32 || nestedAbsmax.numel() != nestedBlocks) throw Bad($"nested_absmax must hold {nestedBlocks} float32 values");
            if (nestedQuantMap!.numel() != 256) throw Bad("nested_quant_map must hold 256 values");
            var (sortedNested, nestedRank) = Sorted(nestedQuantMap.to(device));
            nestedCode = sortedNested;
            codes = nestedRank.index_select(0, absmax.to(device).reshape(-1).to(ScalarType.Int64)).to(ScalarType.Byte);
            var paddedCodes = nestedBlocks * FourBit.AbsmaxBlocksize;
            if (codes.numel() < paddedCodes) codes = nn.functional.pad(codes, [0, paddedCodes - codes.numel()]);
            scales = nestedAbsmax.to(device).reshape(-1);
            offset = (double)(float)state["nested_offset"]!.GetValue<double>();
        }
        var result = FourBitTensor.FromParts(packed.contiguous().DetachFromDisposeScope(), absmaxF?.contiguous().DetachFromDisposeScope(),
            codes?.contiguous().DetachFromDisposeScope(), scales?.contiguous().DetachFromDisposeScope(), offset, shape, quantType, blocksize,
            code.DetachFromDisposeScope(), nestedCode?.DetachFromDisposeScope());
        return result;
    }

    /// <summary>
    /// The serialized parts of <paramref name="w"/> as bitsandbytes writes them, CPU tensors keyed by suffix ("" for the packed
    /// weight, ".absmax", ...). <paramref name="dtype"/> is recorded as the weight's original dtype.
    /// </summary>
    public static List<(string suffix, Tensor tensor)> Write(FourBitTensor w, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var n = w.Numel;
        var blocks = (n + w.Blocksize - 1) / w.Blocksize;
        // Back to bitsandbytes' code order: sorted position i holds the value that bitsandbytes indexes as canonical[i].
        var canonical = FourBit.CodeValues(w.QuantType);
        var ours = w.Code.cpu().data<float>().ToArray();
        var toBnb = new long[16];
        var taken = new bool[16];
        for (var i = 0; i < 16; i++)
        {
            var j = Enumerable.Range(0, 16).Where(k => !taken[k]).OrderBy(k => Math.Abs(canonical[k] - ours[i])).First();
            if (Math.Abs(canonical[j] - ours[i]) > 1e-6) throw new InvalidOperationException($"the weight's code value {ours[i]} is not a bitsandbytes {w.QuantType} value");
            (toBnb[i], taken[j]) = (j, true);
        }
        var packed = Renumber4(w.Packed.cpu().reshape(-1), tensor(toBnb)).narrow(0, 0, (n + 1) / 2).reshape((n + 1) / 2, 1);
        var parts = new List<(string, Tensor)> { ("", packed), (".quant_map", tensor(canonical)) };
        var state = new JsonObject
        {
            ["quant_type"] = w.QuantType,
            ["blocksize"] = w.Blocksize,
            ["dtype"] = DTypeName(dtype),
            ["shape"] = new JsonArray(w.Shape.Select(d => (JsonNode)d).ToArray()),
        };
        if (!w.DoubleQuantized) parts.Insert(1, (".absmax", w.Absmax!.cpu().clone()));
        else
        {
            parts.Insert(1, (".absmax", w.AbsmaxCodes!.cpu().narrow(0, 0, blocks).clone()));
            parts.Add((".nested_absmax", w.AbsmaxScales!.cpu().clone()));
            parts.Add((".nested_quant_map", w.NestedCode!.cpu().clone()));
            state["nested_blocksize"] = FourBit.AbsmaxBlocksize;
            state["nested_dtype"] = "float32";
            state["nested_offset"] = (double)(float)w.AbsmaxOffset;
        }
        parts.Add((QuantStateSuffix(w.QuantType), tensor(Encoding.UTF8.GetBytes(PythonJson(state)))));
        foreach (var (_, t) in parts) t.MoveToOuterDisposeScope();
        return parts;
    }

    /// <summary>transformers' dtype names (the quant_state's dtype, config.json's bnb_4bit_compute_dtype).</summary>
    public static string DTypeName(ScalarType t) => t switch
    {
        ScalarType.BFloat16 => "bfloat16",
        ScalarType.Float16 => "float16",
        ScalarType.Float32 => "float32",
        _ => throw new ArgumentException($"4-bit weights record a floating-point dtype, not {t}"),
    };

    // json.dumps' default layout (", " and ": "), so the bytes match what Python writes for the same dict.
    private static string PythonJson(JsonObject o) =>
        "{" + string.Join(", ", o.Select(kv => $"\"{kv.Key}\": {PythonValue(kv.Value!)}")) + "}";

    private static string PythonValue(JsonNode v) => v switch
    {
        JsonArray a => "[" + string.Join(", ", a.Select(x => PythonValue(x!))) + "]",
        JsonValue s when s.TryGetValue<string>(out var str) => JsonSerializer.Serialize(str),
        JsonValue d when d.TryGetValue<double>(out var x) => x.ToString("R", CultureInfo.InvariantCulture) is var r && !r.Contains('.') && !r.Contains('E') ? r + ".0" : r,
        _ => v.ToJsonString(),
    };

    // The values sorted, and for each original index its rank among them (stable, so +0 and -0 keep their order).
    private static (Tensor sorted, Tensor rank) Sorted(Tensor map)
    {
        var values = map.cpu().to(ScalarType.Float32).data<float>().ToArray();
        var order = Enumerable.Range(0, values.Length).OrderBy(i => values[i]).ToArray();
        var rank = new long[values.Length];
        for (var r = 0; r < order.Length; r++) rank[order[r]] = r;
        return (tensor(order.Select(i => values[i]).ToArray(), device: map.device), tensor(rank, device: map.device));
    }

    // Renumbers the two 4-bit codes of every byte through a 16-entry table (identity tables cost one lookup).
    private static Tensor Renumber4(Tensor packed, Tensor table)
    {
        var t = table.cpu().data<long>().ToArray();
        if (t.Select((v, i) => v == i).All(x => x)) return packed;
        var lut = Enumerable.Range(0, 256).Select(b => (byte)((t[b >> 4] << 4) | t[b & 15])).ToArray();
        return tensor(lut, device: packed.device).index_select(0, packed.to(ScalarType.Int64));
    }
}
