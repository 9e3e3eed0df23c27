using LoRAHub.Abstractions;

// Required: the host loads plugins built against its contract major (and a minor that is not newer).
[assembly: AdapterPlugin(ContractVersion.Major, ContractVersion.Minor)]
