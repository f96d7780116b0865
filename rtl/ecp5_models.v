// Behavioural models of the ECP5 primitives rtl/hard_blocks.py and rtl/fanout.py instantiate, for Verilator.
//
// Only the modes the unit uses are modelled; any other parameter value stops the simulation
// ($fatal), so a model never silently stands in for a mode it does not describe. Address and
// data conventions follow Yosys's own mapping (share/lattice/brams_map_16kd.v): a 14-bit
// bit-granular address, the word address in its upper bits; in the 36-bit pseudo-dual-port
// mode port A writes {DIB, DIA} with byte enables ADA[3:0] and port B reads {DOB, DOA}.

module DP16KD #(
    parameter integer DATA_WIDTH_A = 18,
    parameter integer DATA_WIDTH_B = 18,
    parameter REGMODE_A = "NOREG",
    parameter REGMODE_B = "NOREG",
    parameter RESETMODE = "SYNC",
    parameter ASYNC_RESET_RELEASE = "SYNC",
    parameter CSDECODE_A = "0b000",
    parameter CSDECODE_B = "0b000",
    parameter WRITEMODE_A = "NORMAL",
    parameter WRITEMODE_B = "NORMAL",
    parameter GSR = "DISABLED"
) (
    input DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7, DIA6, DIA5, DIA4, DIA3, DIA2, DIA1, DIA0,
    input ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3, ADA2, ADA1, ADA0,
    input CEA, OCEA, CLKA, WEA, RSTA, CSA2, CSA1, CSA0,
    output DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6, DOA5, DOA4, DOA3, DOA2, DOA1, DOA0,
    input DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9, DIB8, DIB7, DIB6, DIB5, DIB4, DIB3, DIB2, DIB1, DIB0,
    input ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3, ADB2, ADB1, ADB0,
    input CEB, OCEB, CLKB, WEB, RSTB, CSB2, CSB1, CSB0,
    output DOB17, DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6, DOB5, DOB4, DOB3, DOB2, DOB1, DOB0
);
    localparam integer W = DATA_WIDTH_A;
    localparam integer SH = W == 36 ? 5 : W == 18 ? 4 : W == 9 ? 3 : W == 4 ? 2 : W == 2 ? 1 : 0;
    localparam integer WORDS = 16384 >> SH;

    wire [17:0] dia = {DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7, DIA6, DIA5, DIA4, DIA3, DIA2, DIA1, DIA0};
    wire [17:0] dib = {DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9, DIB8, DIB7, DIB6, DIB5, DIB4, DIB3, DIB2, DIB1, DIB0};
    wire [13:0] ada = {ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3, ADA2, ADA1, ADA0};
    wire [13:0] adb = {ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3, ADB2, ADB1, ADB0};

    initial begin
        if (DATA_WIDTH_A != DATA_WIDTH_B || !(W == 36 || W == 18 || W == 9 || W == 4 || W == 2 || W == 1))
            $fatal(1, "DP16KD model: widths %0d / %0d not modelled (equal widths of 1..36 only)", DATA_WIDTH_A, DATA_WIDTH_B);
        if (REGMODE_A != REGMODE_B || (REGMODE_B != "OUTREG" && REGMODE_B != "NOREG"))
            $fatal(1, "DP16KD model: REGMODE_A and REGMODE_B must be equal, NOREG or OUTREG");
        if (WRITEMODE_A != "NORMAL" || CSDECODE_A != "0b000" || CSDECODE_B != "0b000")
            $fatal(1, "DP16KD model: only WRITEMODE NORMAL and CSDECODE 0b000 are modelled");
    end

    reg [W-1:0] mem [0:WORDS-1];
    reg [W-1:0] latch, out_reg;
    wire [W-1:0] din = W == 36 ? {dib, dia} : dia[W-1:0];
    wire [13-SH:0] wa = ada[13:SH];
    wire [13-SH:0] ra = adb[13:SH];

    // byte enables: ADA[3:0] in the 36-bit mode, ADA[1:0] in the 18-bit mode, 9 bits each
    integer i;
    always @(posedge CLKA) begin
        if (W == 36 ? CEA : (CEA && WEA)) begin
            if (W >= 18) begin
                for (i = 0; i < W / 9; i = i + 1)
                    if (ada[i]) mem[wa][i * 9 +: 9] <= din[i * 9 +: 9];
            end else
                mem[wa] <= din;
        end
        if (RSTA || CSA0 || CSA1 || CSA2 || (W == 36 && !WEA))
            $fatal(1, "DP16KD model: RSTA, CSA and (36-bit mode) WEA = 0 are not modelled");
    end
    always @(posedge CLKB) begin
        if (CEB) latch <= mem[ra];
        if (OCEB) out_reg <= latch;
        if (WEB || RSTB || CSB0 || CSB1 || CSB2)
            $fatal(1, "DP16KD model: writes on port B, RSTB and CSB are not modelled");
    end
    wire [W-1:0] dout = REGMODE_B == "OUTREG" ? out_reg : latch;
    wire [35:0] wide = {{(36 - W){1'b0}}, dout};
    // the 36-bit mode reads on DOB:DOA; the narrower modes on port B only
    assign {DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6, DOA5, DOA4, DOA3, DOA2, DOA1, DOA0} =
        W == 36 ? wide[17:0] : 18'd0;
    assign {DOB17, DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6, DOB5, DOB4, DOB3, DOB2, DOB1, DOB0} =
        W == 36 ? wide[35:18] : wide[17:0];
endmodule


module MULT18X18D #(
    parameter REG_INPUTA_CLK = "NONE",
    parameter REG_INPUTB_CLK = "NONE",
    parameter REG_OUTPUT_CLK = "NONE",
    parameter REG_PIPELINE_CLK = "NONE",
    parameter GSR = "DISABLED"
) (
    input A17, A16, A15, A14, A13, A12, A11, A10, A9, A8, A7, A6, A5, A4, A3, A2, A1, A0,
    input B17, B16, B15, B14, B13, B12, B11, B10, B9, B8, B7, B6, B5, B4, B3, B2, B1, B0,
    input SIGNEDA, SIGNEDB, SOURCEA, SOURCEB, CLK0, CE0, RST0,
    output P35, P34, P33, P32, P31, P30, P29, P28, P27, P26, P25, P24, P23, P22, P21, P20, P19, P18,
    output P17, P16, P15, P14, P13, P12, P11, P10, P9, P8, P7, P6, P5, P4, P3, P2, P1, P0
);
    initial begin
        if (REG_INPUTA_CLK != "CLK0" || REG_INPUTB_CLK != "CLK0" || REG_OUTPUT_CLK != "CLK0"
                || REG_PIPELINE_CLK != "NONE")
            $fatal(1, "MULT18X18D model: only input and output registers on CLK0, no pipeline register, are modelled");
    end
    wire signed [17:0] a = {A17, A16, A15, A14, A13, A12, A11, A10, A9, A8, A7, A6, A5, A4, A3, A2, A1, A0};
    wire signed [17:0] b = {B17, B16, B15, B14, B13, B12, B11, B10, B9, B8, B7, B6, B5, B4, B3, B2, B1, B0};
    reg signed [17:0] a_r, b_r;
    reg signed [35:0] p_r;
    always @(posedge CLK0) begin
        if (CE0) begin
            a_r <= a;
            b_r <= b;
            p_r <= a_r * b_r;
        end
        if (RST0 || !SIGNEDA || !SIGNEDB || SOURCEA || SOURCEB)
            $fatal(1, "MULT18X18D model: only signed x signed parallel inputs without reset are modelled");
    end
    assign {P35, P34, P33, P32, P31, P30, P29, P28, P27, P26, P25, P24, P23, P22, P21, P20, P19, P18,
            P17, P16, P15, P14, P13, P12, P11, P10, P9, P8, P7, P6, P5, P4, P3, P2, P1, P0} = p_r;
endmodule


// TRELLIS_FF as rtl/fanout.py instantiates it: clock enable tied high, synchronous LSR that
// loads REGSET (also the power-on value), no global set/reset.
module TRELLIS_FF #(
    parameter GSR = "DISABLED",
    parameter CEMUX = "1",
    parameter CLKMUX = "CLK",
    parameter LSRMUX = "LSR",
    parameter SRMODE = "LSR_OVER_CE",
    parameter REGSET = "RESET",
    parameter LSRMODE = "LSR"
) (
    input CLK, LSR, CE, DI, M,
    output reg Q
);
    localparam SRVAL = REGSET == "SET" ? 1'b1 : 1'b0;
    initial begin
        if (CEMUX != "1" || CLKMUX != "CLK" || LSRMUX != "LSR" || SRMODE != "LSR_OVER_CE" || LSRMODE != "LSR"
                || GSR != "DISABLED" || (REGSET != "SET" && REGSET != "RESET"))
            $fatal(1, "TRELLIS_FF model: only CEMUX 1, CLKMUX CLK, LSRMUX LSR, SRMODE LSR_OVER_CE, LSRMODE LSR, GSR DISABLED are modelled");
        Q = SRVAL;
    end
    always @(posedge CLK)
        Q <= LSR ? SRVAL : DI;
endmodule
