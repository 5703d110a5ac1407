// Reference firmware for the harness's line-based meter format (see harness/meters/line.py):
// an INA226 on I2C, one line per conversion, `t_us,bus_mV,current_uA\n`, 115200 baud
// (boards with native USB serial, such as a Pico or an ESP32-S2/S3, are not limited by
// the baud rate and keep up with 1000 lines/s). Lines starting with '#' are metadata.
// Wiring: INA226 SDA/SCL to the board's I2C pins, the shunt in the Pi's 5 V supply line.
#include <Wire.h>

const uint8_t INA226_ADDRESS = 0x40;
const float SHUNT_OHMS = 0.01;           // the shunt on your INA226 module
// Config: averages 4, bus and shunt conversion 140 us each, shunt and bus continuous.
const uint16_t CONFIG = (0b001 << 9) | (0b000 << 6) | (0b000 << 3) | 0b111;

void writeRegister(uint8_t reg, uint16_t value) {
  Wire.beginTransmission(INA226_ADDRESS);
  Wire.write(reg);
  Wire.write(value >> 8);
  Wire.write(value & 0xFF);
  Wire.endTransmission();
}

int16_t readRegister(uint8_t reg) {
  Wire.beginTransmission(INA226_ADDRESS);
  Wire.write(reg);
  Wire.endTransmission(false);
  Wire.requestFrom(INA226_ADDRESS, (uint8_t)2);
  return (int16_t)((Wire.read() << 8) | Wire.read());
}

void setup() {
  Serial.begin(115200);
  Wire.begin();
  Wire.setClock(400000);
  writeRegister(0x00, CONFIG);
  writeRegister(0x06, 0x0400);  // mask/enable: conversion-ready flag
  Serial.println("# INA226 t_us,bus_mV,current_uA shunt_ohms=0.01 averages=4");
}

void loop() {
  while ((readRegister(0x06) & 0x0008) == 0) {}  // wait for the next conversion
  unsigned long t_us = micros();
  long bus_mV = (long)readRegister(0x02) * 125 / 100;             // 1.25 mV per bit
  long shunt_nV = (long)readRegister(0x01) * 2500;                  // 2.5 uV per bit
  long current_uA = (long)(shunt_nV / 1000.0 / SHUNT_OHMS);
  Serial.print(t_us);
  Serial.print(',');
  Serial.print(bus_mV);
  Serial.print(',');
  Serial.println(current_uA);
}
