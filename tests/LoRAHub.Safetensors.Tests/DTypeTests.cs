namespace LoRAHub.Safetensors.Tests;

public class DTypeTests
{
    [Theory]
    [InlineData("F64", SafetensorsDType.F64, 8)]
    [InlineData("F32", SafetensorsDType.F32, 4)]
    [InlineData("F16", SafetensorsDType.F16, 2)]
    [InlineData("BF16", SafetensorsDType.BF16, 2)]
    [InlineData("I64", SafetensorsDType.I64, 8)]
    [InlineData("I32", SafetensorsDType.I32, 4)]
    [InlineData("I16", SafetensorsDType.I16, 2)]
    [InlineData("I8", SafetensorsDType.I8, 1)]
    [InlineData("U8", SafetensorsDType.U8, 1)]
    [InlineData("BOOL", SafetensorsDType.BOOL, 1)]
    public void Codes_and_sizes_follow_the_spec(string code, SafetensorsDType dtype, int size)
    {
        Assert.Equal(dtype, SafetensorsDTypes.Parse(code));
        Assert.Equal(code, SafetensorsDTypes.ToCode(dtype));
        Assert.Equal(size, SafetensorsDTypes.ElementSize(dtype));
    }

    [Fact]
    public void Every_enum_value_has_a_code()
    {
        Assert.Equal(10, SafetensorsDTypes.All.Count);
        foreach (var dtype in SafetensorsDTypes.All)
            Assert.Equal(dtype, SafetensorsDTypes.Parse(SafetensorsDTypes.ToCode(dtype)));
    }

    [Theory]
    [InlineData("f32")]
    [InlineData(" F32")]
    [InlineData("1")]
    [InlineData("Q4")]
    [InlineData("")]
    public void Unknown_codes_are_rejected_and_the_known_ones_listed(string code)
    {
        var e = Assert.Throws<FormatException>(() => SafetensorsDTypes.Parse(code));
        Assert.Contains($"'{code}'", e.Message);
        Assert.Contains("F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL", e.Message);
    }

    [Fact]
    public void Spec_dtypes_LoRAHub_lacks_are_called_unsupported_not_unknown()
    {
        var e = Assert.Throws<FormatException>(() => SafetensorsDTypes.Parse("F8_E4M3"));
        Assert.Contains("does not support", e.Message);
    }

    [Fact]
    public void Undefined_enum_values_are_rejected()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => SafetensorsDTypes.ElementSize((SafetensorsDType)99));
        Assert.Throws<ArgumentOutOfRangeException>(() => SafetensorsDTypes.ToCode((SafetensorsDType)99));
    }
}
