namespace LoRAHub.TorchExtensions.Quantization;

/// <summary>The codebooks of QLoRA and bitsandbytes.</summary>
public static class QuantizationCodes
{
    /// <summary>NormalFloat4: 16 quantiles of N(0, 1) scaled to [-1, 1], as bitsandbytes defines them (index 0..15).</summary>
    public static readonly float[] NF4 =
    [
        -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
        -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
        0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
        0.7229568362236023f, 1.0f,
    ];

    /// <summary>bitsandbytes' FP4 (e2m1) values by code index, normalised by their maximum (12).</summary>
    public static readonly float[] FP4 =
        new[] { 0f, 0.0625f, 8f, 12f, 4f, 6f, 2f, 3f, -0f, -0.0625f, -8f, -12f, -4f, -6f, -2f, -3f }.Select(v => v / 12f).ToArray();

    /// <summary>
    /// bitsandbytes' signed 8-bit "dynamic" code (create_dynamic_map: 7 exponent bits, 256 values), used to quantize
    /// the absmax constants in double quantization.
    /// </summary>
    public static readonly float[] Dynamic8 = BuildDynamic();

    private static float[] BuildDynamic()
    {
        const int maxExponentBits = 7, nonSignBits = 7;
        var data = new List<double>();
        for (var i = 0; i < maxExponentBits; i++)
        {
            var fractionItems = (1 << (i + nonSignBits - maxExponentBits)) + 1;
            var scale = Math.Pow(10, -(maxExponentBits - 1) + i);
            // Means of consecutive points of linspace(0.1, 1, fractionItems), in float32 as torch computes them.
            var boundaries = Enumerable.Range(0, fractionItems).Select(k => (float)(0.1 + (1 - 0.1) * k / (fractionItems - 1))).ToArray();
            for (var k = 0; k < fractionItems - 1; k++)
            {
                var mean = (boundaries[k] + boundaries[k + 1]) / 2f;
                data.Add(scale * mean);
                data.Add(-scale * mean);
            }
        }
        data.Add(0);
        data.Add(1.0);
        return data.Select(d => (float)d).OrderBy(v => v).ToArray();
    }
}
