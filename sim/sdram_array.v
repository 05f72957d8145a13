// The storage of a large SDRAM part for the Verilator system model (sim/sdram_model.py):
// 2^AW beats of 16 bits, a synchronous read port and a write port with byte enables.
module nibble_sdram_array #(parameter AW = 24) (
    input clk,
    input [AW-1:0] raddr, output reg [15:0] rdata,
    input [AW-1:0] waddr, input [15:0] wdata, input [1:0] wbe, input we
);
    reg [15:0] mem [0:(1 << AW) - 1];
    always @(posedge clk) begin
        rdata <= mem[raddr];
        if (we & wbe[0]) mem[waddr][7:0] <= wdata[7:0];
        if (we & wbe[1]) mem[waddr][15:8] <= wdata[15:8];
    end
endmodule
